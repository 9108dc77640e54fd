#!/usr/bin/env bash
# Provision an Ubuntu 22.04 host for Albert Deploy. Idempotent: every item is checked first and
# changed only when needed; a second run prints "no change".
#
#   sudo GITLAB_PASSWORD=... GITLAB_SSH_PUBLIC_KEY="ssh-ed25519 AAAA..." ./init_vm.sh [options]
#   sudo ./init_vm.sh --env-file FILE [options]      FILE: KEY=VALUE lines (chmod 600)
#   ... | sudo bash -s -- [options]                   (fab provision: secrets set before the script)
#
# Options:
#   --gpu | --no-gpu     force the NVIDIA part on/off (default: on when an NVIDIA GPU is present)
#   --user NAME          deploy user (default: gitlab)
#   --storage-dir DIR    model storage (default: /data/models)
#   --dry-run            check everything, change nothing, print what would change
#   --skip-packages      leave apt packages alone (hosts whose packages are managed elsewhere)
#
# Output: "changed: X" per change ("would change: X" in a dry run), "note: X" for things skipped,
# then "init_vm: N change(s)" or "init_vm: no change". Exit 2: bad input, nothing touched.
# Secrets are never echoed nor put in a command line (the password is hashed via stdin).
# A no-op run is mostly checks: they use bash built-ins (read, [[ ]]) where a tool is not needed,
# so that a re-run costs a few processes, not dozens (fab provision runs it on every host).

set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
readonly SUDOERS_PREFIX=/etc/sudoers.d/albert-
readonly KEYS_BEGIN="# BEGIN albert managed keys"
readonly KEYS_END="# END albert managed keys"

USER_NAME=gitlab
STORAGE_DIR=/data/models
GPU=auto
DRY_RUN=0
SKIP_PACKAGES=0
ENV_FILE=
CHANGES=0
APT_UPDATED=0

say() { printf '%s\n' "$*"; }
note() { say "note: $*"; }
die() { say "init_vm: error: $*" >&2; exit 2; }

# act DESCRIPTION CMD...: run CMD (or, in a dry run, only report it) and count the change.
act() {
  local what=$1; shift
  CHANGES=$((CHANGES + 1))
  if ((DRY_RUN)); then say "would change: $what"; return 0; fi
  "$@"
  say "changed: $what"
}

parse_args() {
  while (($#)); do
    case $1 in
      --gpu) GPU=yes ;;
      --no-gpu) GPU=no ;;
      --user) USER_NAME=${2:?--user needs a value}; shift ;;
      --storage-dir) STORAGE_DIR=${2:?--storage-dir needs a value}; shift ;;
      --env-file) ENV_FILE=${2:?--env-file needs a value}; shift ;;
      --dry-run) DRY_RUN=1 ;;
      --skip-packages) SKIP_PACKAGES=1 ;;
      -h | --help) sed -n '2,20p' "$0" 2>/dev/null || true; exit 0 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
}

# KEY=VALUE lines; only the two known keys are read, nothing is evaluated.
read_env_file() {
  [[ -r $ENV_FILE ]] || die "cannot read --env-file $ENV_FILE"
  local line key value
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line == *=* ]] || continue
    key=${line%%=*} value=${line#*=}
    value=${value%\"} value=${value#\"}
    case $key in
      GITLAB_PASSWORD) GITLAB_PASSWORD=$value ;;
      GITLAB_SSH_PUBLIC_KEY) GITLAB_SSH_PUBLIC_KEY=$value ;;
    esac
  done <"$ENV_FILE"
}

validate() {
  ((EUID == 0)) || die "run as root (sudo $0 ...)"
  [[ -n $ENV_FILE ]] && read_env_file
  local missing=()
  [[ -n ${GITLAB_PASSWORD:-} ]] || missing+=(GITLAB_PASSWORD)
  [[ -n ${GITLAB_SSH_PUBLIC_KEY:-} ]] || missing+=(GITLAB_SSH_PUBLIC_KEY)
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: set them (CI/CD variables, or --env-file FILE with KEY=VALUE lines); nothing was changed"
  [[ $GITLAB_PASSWORD != *$'\n'* ]] || die "GITLAB_PASSWORD must be one line; nothing was changed"
  [[ $GITLAB_SSH_PUBLIC_KEY =~ ^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)\ [A-Za-z0-9+/=]+(\ .*)?$ ]] ||
    die "GITLAB_SSH_PUBLIC_KEY is not one OpenSSH public key line (ssh-ed25519 AAAA... comment); nothing was changed"
  [[ $USER_NAME =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || die "--user '$USER_NAME' is not a valid user name"
  [[ $STORAGE_DIR == /* && $STORAGE_DIR != *[[:space:]]* ]] || die "--storage-dir must be an absolute path without spaces"
  if [[ -r /etc/os-release ]]; then
    local key value id= version=
    while IFS='=' read -r key value; do  # KEY=value or KEY="value" lines
      value=${value%\"} value=${value#\"}
      case $key in ID) id=$value ;; VERSION_ID) version=$value ;; esac
    done </etc/os-release
    [[ $id == ubuntu && $version == 22.04 ]] || note "made for Ubuntu 22.04, this is $id $version"
  fi
}

# --- packages --------------------------------------------------------------------------------
# INSTALLED=" p1 p2 ": the installed ones among "$@" (one dpkg-query, parsed by bash)
installed_packages() {
  local pkg status
  INSTALLED=" "
  while read -r pkg status; do
    [[ $status == installed ]] && INSTALLED+="$pkg "
  done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null || true)
  return 0
}

apt_candidate() {  # exit 0 if apt can install $1
  apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [^(]'
}

# Which compose plugin apt offers ("" if none). apt-cache takes seconds, so a "none" answer is
# remembered until the package lists change (apt-get update).
compose_package() {
  local have=$1 stamp=/var/lib/albert/init_vm.no-compose
  [[ -f $stamp && ! /var/lib/apt/lists -nt $stamp ]] && return 0
  if [[ $have == *" docker-ce "* ]] && apt_candidate docker-compose-plugin; then echo docker-compose-plugin
  elif apt_candidate docker-compose-v2; then echo docker-compose-v2
  elif ((!DRY_RUN)); then mkdir -p "${stamp%/*}" && touch "$stamp"; fi
}

apt_install() {
  if ((!APT_UPDATED)) && ((!DRY_RUN)); then apt-get update -qq; APT_UPDATED=1; fi
  act "apt install $*" apt_get_install "$@"
}

apt_get_install() {
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "$@" >/dev/null
}

ensure_packages() {
  ((SKIP_PACKAGES)) && { note "packages: skipped (--skip-packages)"; return 0; }
  local wanted=(jq python3 python3-venv fail2ban docker.io docker-ce docker-compose-plugin docker-compose-v2)
  local have missing=()
  installed_packages "${wanted[@]}"
  have=$INSTALLED
  for p in jq python3 python3-venv fail2ban; do
    [[ $have == *" $p "* ]] || missing+=("$p")
  done
  local docker_pkg=
  [[ $have == *" docker-ce "* || $have == *" docker.io "* ]] || { missing+=(docker.io); docker_pkg=docker.io; }
  if [[ $have != *" docker-compose-plugin "* && $have != *" docker-compose-v2 "* ]]; then
    local compose
    compose=$(compose_package "$have")
    if [[ -n $compose ]]; then missing+=("$compose")
    else note "compose plugin: no package available here (docker-compose-plugin / docker-compose-v2), skipped"; fi
  fi
  : "$docker_pkg"
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  if [[ -d /run/systemd/system ]]; then
    local unit
    for unit in docker fail2ban; do
      systemctl is-enabled --quiet "$unit" 2>/dev/null && systemctl is-active --quiet "$unit" ||
        act "service $unit enabled and started" systemctl enable --now --quiet "$unit"
    done
  else
    note "no systemd: services docker and fail2ban not managed"
  fi
}

# --- NVIDIA ----------------------------------------------------------------------------------
has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && return 0
  local dev vendor class
  for dev in /sys/bus/pci/devices/*; do
    [[ -r $dev/vendor ]] || continue
    read -r vendor <"$dev/vendor" && read -r class <"$dev/class" || continue
    [[ $vendor == 0x10de && $class == 0x03* ]] && return 0
  done
  return 1
}

ensure_nvidia() {
  case $GPU in
    no) return 0 ;;
    auto) has_nvidia_gpu || return 0 ;;
  esac
  local list=/etc/apt/sources.list.d/nvidia-container-toolkit.list
  local keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
  if [[ ! -s $list ]]; then
    act "apt source for nvidia-container-toolkit ($list)" add_nvidia_repo "$list" "$keyring"
    APT_UPDATED=0
  fi
  local have missing=() p
  installed_packages nvidia-driver-535 nvidia-driver-535-server nvidia-cuda-toolkit nvidia-container-toolkit
  have=$INSTALLED
  [[ $have == *" nvidia-driver-535"* ]] || missing+=(nvidia-driver-535)
  for p in nvidia-cuda-toolkit nvidia-container-toolkit; do [[ $have == *" $p "* ]] || missing+=("$p"); done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  if ! grep -qs '"nvidia"' /etc/docker/daemon.json; then
    act "docker nvidia runtime (/etc/docker/daemon.json)" nvidia-ctk runtime configure --runtime=docker --quiet
    if [[ -d /run/systemd/system ]]; then act "docker restarted for the nvidia runtime" systemctl restart docker; fi
  fi
}

add_nvidia_repo() {
  local list=$1 keyring=$2 base=https://nvidia.github.io/libnvidia-container
  curl -fsSL "$base/gpgkey" | gpg --batch --yes --dearmor -o "$keyring"
  curl -fsSL "$base/stable/deb/nvidia-container-toolkit.list" |
    sed "s#deb https://#deb [signed-by=$keyring] https://#g" >"$list"
}

# --- the deploy user -------------------------------------------------------------------------
ensure_user() {
  local entry=
  if ! entry=$(getent passwd "$USER_NAME"); then
    act "user $USER_NAME created" useradd --create-home --shell /bin/bash "$USER_NAME"
  fi
  if ! getent group docker >/dev/null; then act "group docker created" groupadd --system docker; fi
  if ((DRY_RUN)) && [[ -z $entry ]]; then  # (a dry run created nobody)
    act "$USER_NAME: password, docker group, authorized_keys" true
    return 0
  fi
  if [[ " $(id -nG "$USER_NAME") " != *" docker "* ]]; then
    act "$USER_NAME added to group docker" usermod -aG docker "$USER_NAME"
  fi
  ensure_password
  ensure_authorized_key
}

# The stored hash is compared with the password hashed with the same salt (sha-512 crypt).
ensure_password() {
  local entry= name current= salt rest
  entry=$(getent shadow "$USER_NAME") || true
  IFS=: read -r name current rest <<<"$entry"
  if [[ $current == '$6$'* ]]; then
    IFS='$' read -r rest rest salt rest <<<"$current"  # $6$SALT$HASH
    [[ $(printf '%s' "$GITLAB_PASSWORD" | openssl passwd -6 -salt "$salt" -stdin) == "$current" ]] && return 0
  fi
  act "password of $USER_NAME set" set_password
}

set_password() {
  local hash
  hash=$(printf '%s' "$GITLAB_PASSWORD" | openssl passwd -6 -stdin)
  printf '%s:%s\n' "$USER_NAME" "$hash" | chpasswd -e
}

# authorized_keys keeps lines it does not manage; the block between the markers is ours.
ensure_authorized_key() {
  local entry rest home dir file desired
  entry=$(getent passwd "$USER_NAME")
  IFS=: read -r rest rest rest rest rest home rest <<<"$entry"  # name:x:uid:gid:gecos:HOME:shell
  dir=$home/.ssh file=$home/.ssh/authorized_keys
  desired=$( { [[ -f $file ]] && sed "/^$KEYS_BEGIN\$/,/^$KEYS_END\$/d" "$file"; printf '%s\n%s\n%s\n' "$KEYS_BEGIN" "$GITLAB_SSH_PUBLIC_KEY" "$KEYS_END"; } )
  if [[ ! -f $file ]] || [[ $(<"$file") != "$desired" ]]; then
    act "$file: managed key" write_owned "$file" 0600 "$desired"
  fi
  [[ -f $file ]] || return 0  # dry run: it would be written with the right modes
  if [[ $(stat -c '%U %a' "$dir" "$file") != "$USER_NAME 700"$'\n'"$USER_NAME 600" ]]; then
    act "$dir: owner $USER_NAME, modes 700/600" fix_ssh_modes "$dir" "$file"
  fi
}

write_owned() {  # FILE MODE CONTENT: atomic write owned by the deploy user
  local file=$1 mode=$2 dir
  dir=$(dirname "$file")
  install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$dir"
  (umask 077 && printf '%s\n' "$3" >"$file.tmp")
  chown "$USER_NAME:$USER_NAME" "$file.tmp" && chmod "$mode" "$file.tmp" && mv -f "$file.tmp" "$file"
}

fix_ssh_modes() {
  chown "$USER_NAME:$USER_NAME" "$1" "$2" && chmod 700 "$1" && chmod 600 "$2"
}

# --- narrowly scoped sudo --------------------------------------------------------------------
# Only what the tools run as root: albert systemd units, the storage dir, nvidia-smi.
# (Membership of group docker is root-equivalent anyway: keep the deploy key safe.)
sudoers_content() {  # sets SUDOERS (read from a here-document: no process)
  local u=$USER_NAME s=$STORAGE_DIR
  IFS= read -r -d '' SUDOERS <<EOF || true
# Managed by Albert Deploy (utils/init_vm.sh): changes are overwritten.
Cmnd_Alias ALBERT_UNITS = /usr/bin/systemctl start albert-*, /usr/bin/systemctl stop albert-*, \\
  /usr/bin/systemctl restart albert-*, /usr/bin/systemctl status albert-*, /usr/bin/systemctl daemon-reload
Cmnd_Alias ALBERT_STORAGE = /usr/bin/mkdir -p $s, /usr/bin/chown $u\\:$u $s
Cmnd_Alias ALBERT_GPU = /usr/bin/nvidia-smi
$u ALL=(root) NOPASSWD: ALBERT_UNITS, ALBERT_STORAGE, ALBERT_GPU
EOF
}

ensure_sudoers() {
  local file=$SUDOERS_PREFIX$USER_NAME current= tmp
  sudoers_content
  [[ -f $file ]] && { IFS= read -r -d '' current <"$file" || true; }
  # same text, and the same size (read stops at a NUL byte), owner and mode: nothing to do
  if [[ $current == "$SUDOERS" && $(stat -c '%U %a %s' "$file") == "root 440 ${#SUDOERS}" ]]; then return 0; fi
  tmp=$(mktemp)
  printf '%s' "$SUDOERS" >"$tmp"
  if ! visudo -cqf "$tmp" >/dev/null; then rm -f "$tmp"; die "the sudoers rules for $USER_NAME do not validate (visudo -cf); nothing installed"; fi
  act "$file: sudo rules for $USER_NAME (validated)" install -m 0440 -o root -g root "$tmp" "$file"
  rm -f "$tmp"
}

# --- storage ---------------------------------------------------------------------------------
ensure_storage() {
  if [[ ! -d $STORAGE_DIR ]]; then
    act "storage dir $STORAGE_DIR created" install -d -m 0755 -o "$USER_NAME" -g "$USER_NAME" "$STORAGE_DIR"
  elif [[ $(stat -c '%U:%G' "$STORAGE_DIR") != "$USER_NAME:$USER_NAME" ]]; then
    act "storage dir $STORAGE_DIR owned by $USER_NAME" chown "$USER_NAME:$USER_NAME" "$STORAGE_DIR"
  fi
}

main() {
  parse_args "$@"
  validate
  ensure_packages
  ensure_nvidia
  ensure_user
  ensure_sudoers
  ensure_storage
  if ((CHANGES == 0)); then say "init_vm: no change"
  elif ((DRY_RUN)); then say "init_vm: $CHANGES change(s) would be made (dry run)"
  else say "init_vm: $CHANGES change(s)"; fi
}

# Run with stdin closed (with `bash -s` stdin is this script: no command may eat it), and exit on
# the same line, so `bash -s` never waits for the end of its stdin.
main "$@" </dev/null; exit $?
