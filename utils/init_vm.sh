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
#   --edge-port N        the front door (HAProxy, run as the deploy user) binds port N < 1024 (80:
#                        [edge] redirect_port, where ACME http-01 arrives): unprivileged binding
#                        from N up (sysctl net.ipv4.ip_unprivileged_port_start, /etc/sysctl.d)
#
# Output: "changed: X" per change ("would change: X" in a dry run), "note: X" for things skipped,
# then "init_vm: N change(s)" or "init_vm: no change". Exit 2: bad input, nothing touched. Exit 3:
# the host is in a state this script will not act on as root (it says what and the fix).
# Secrets are never echoed nor put in a command line (the password is hashed via stdin).
# The deploy user's home is that user's ground: root never reads, writes or chowns through a path
# the user could have planted a symlink in (see ensure_authorized_key).
# A no-op run is mostly checks: they use bash built-ins (read, [[ ]]) where a tool is not needed,
# so that a re-run costs a few processes, not dozens (fab provision runs it on every host).

set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
readonly SUDOERS_PREFIX=/etc/sudoers.d/albert-
readonly SUDOERS_MARK="# Managed by Albert Deploy (utils/init_vm.sh)"
readonly KEYS_BEGIN="# BEGIN albert managed keys"
readonly KEYS_END="# END albert managed keys"

USER_NAME=gitlab
STORAGE_DIR=/data/models
GPU=auto
DRY_RUN=0
SKIP_PACKAGES=0
EDGE_PORT=
ENV_FILE=
CHANGES=0
APT_UPDATED=0
USER_UID= USER_GID=

say() { printf '%s\n' "$*"; }
note() { say "note: $*"; }
die() { say "init_vm: error: $*" >&2; exit 2; }
fail() { say "init_vm: error: $*" >&2; exit 3; }

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
      --edge-port) EDGE_PORT=${2:?--edge-port needs a value}; shift ;;
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
  [[ -z $EDGE_PORT || $EDGE_PORT =~ ^[1-9][0-9]{0,4}$ && $EDGE_PORT -le 65535 ]] || die "--edge-port must be a port number (1-65535)"
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
  local wanted=(jq python3 python3-venv fail2ban haproxy lego openssl docker.io docker-ce docker-compose-plugin docker-compose-v2)
  local have missing=()
  installed_packages "${wanted[@]}"
  have=$INSTALLED
  # haproxy: the api's front door (venv runtime); lego, openssl: its ACME certificate ([edge] tls = "acme")
  for p in jq python3 python3-venv fail2ban haproxy lego openssl; do
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
# Everything under the user's home may be a symlink the user planted (to /etc/shadow, to root's
# keys): root only looks (stat, which follows no final link) and fixes the owner of ~/.ssh itself
# with chown -h. Reading and writing go through as_user, a process with the user's uid and groups,
# so a link can only lead where the user could go anyway; the file is replaced by a rename of a
# fresh temp file (mktemp: O_EXCL), so a link at its name is replaced, never written through.
# (Lines the user cannot read are not kept: sshd reads the file as the user, they never worked.)
ensure_authorized_key() {
  local entry rest home dir file current= desired state
  entry=$(getent passwd "$USER_NAME")
  IFS=: read -r rest rest USER_UID USER_GID rest home rest <<<"$entry"  # name:x:uid:gid:gecos:HOME:shell
  dir=$home/.ssh file=$home/.ssh/authorized_keys
  [[ -L $dir ]] && fail "$dir is a symbolic link: root does not follow links in the home of $USER_NAME. Fix: make it a directory owned by $USER_NAME (mode 700), then re-run"
  if [[ -d $dir ]] && [[ $(stat -c %U -- "$dir") != "$USER_NAME" ]]; then
    act "$dir: owner $USER_NAME" chown -h -- "$USER_UID:$USER_GID" "$dir"
  fi
  if [[ -e $file || -L $file ]]; then
    current=$(as_user cat -- "$file" 2>/dev/null) || current=  # what the user cannot read: nothing
  fi
  desired=$( { [[ -n $current ]] && sed "/^$KEYS_BEGIN\$/,/^$KEYS_END\$/d" <<<"$current"; printf '%s\n%s\n%s\n' "$KEYS_BEGIN" "$GITLAB_SSH_PUBLIC_KEY" "$KEYS_END"; } )
  state=$(stat -c '%U %a %F' -- "$dir" "$file" 2>/dev/null) || state=
  if [[ $current != "$desired" || $state != *$'\n'"$USER_NAME "*" regular file" ]]; then
    act "$file: managed key" write_as_user "$file" "$desired"
  elif [[ $state != "$USER_NAME 700 directory"$'\n'"$USER_NAME 600 regular file" ]]; then
    act "$dir: owner $USER_NAME, modes 700/600" fix_ssh_modes "$dir" "$file" "$desired"
  fi
}

as_user() {  # CMD...: run as the deploy user (uid, gid, groups): never with root's rights
  setpriv --reuid="$USER_UID" --regid="$USER_GID" --init-groups -- "$@"
}

write_as_user() {  # FILE CONTENT: replace FILE atomically as the deploy user, mode 600
  local dir=${1%/*}
  [[ -d $dir ]] || as_user mkdir -m 0700 -- "$dir" || fail "cannot create $dir as $USER_NAME. Fix: check the owner of the home directory"
  # shellcheck disable=SC2016 # $1 and $t are the inner shell's
  printf '%s\n' "$2" | as_user sh -c 'umask 077 && t=$(mktemp "$1.XXXXXXXX") && { cat >"$t" && mv -fT -- "$t" "$1" || { rm -f -- "$t"; exit 1; }; }' sh "$1" ||
    fail "cannot write $1 as $USER_NAME. Fix: make $dir a directory owned by $USER_NAME (mode 700), then re-run"
}

fix_ssh_modes() {  # DIR FILE CONTENT: modes 700/600, the file rewritten if its owner is wrong
  as_user chmod 700 -- "$1" || fail "cannot set the mode of $1 as $USER_NAME"
  if [[ $(stat -c '%U %a' -- "$2") != "$USER_NAME 600" ]]; then write_as_user "$2" "$3"; fi
}

# --- sudo: none -------------------------------------------------------------------------------
# Nothing the tools run on a host as the deploy user needs root (provisioning connects as root or
# an admin), so the user gets no sudo rule. Earlier versions installed rules nothing called:
# `systemctl status albert-*` (a pager as root, and `*` matched extra arguments), nvidia-smi with
# any arguments, mkdir/chown of the storage dir. That file is removed; a file of the same name that
# we did not write is left alone. A rule added later names the exact command line the code runs.
# (Membership of group docker is root-equivalent anyway: keep the deploy key safe.)
ensure_no_sudoers() {
  local file=$SUDOERS_PREFIX$USER_NAME first=
  [[ -e $file || -L $file ]] || return 0
  IFS= read -r first <"$file" || true
  if [[ $first == "$SUDOERS_MARK"* ]]; then
    act "$file removed (sudo rules nothing uses)" rm -f -- "$file"
  else
    note "$file: not written by Albert Deploy: left alone"
  fi
}

# --- the front door: its low port --------------------------------------------------------------
# HAProxy runs as the deploy user (venv runtime: under albert supervise; docker: --network host,
# --user), so a port below 1024 (80: [edge] redirect_port, where the CA's http-01 challenges
# arrive) needs the kernel's unprivileged port range to start there. Our own sysctl.d file keeps
# it across reboots; the live value is lowered when needed, never raised (another setting may
# want it lower). Ports from N to 1023 become bindable by every local user: the host is the
# deployment's own.
readonly EDGE_SYSCTL=/etc/sysctl.d/60-albert-edge.conf
readonly EDGE_KEY=net.ipv4.ip_unprivileged_port_start

ensure_edge_port() {
  [[ -n $EDGE_PORT ]] || return 0
  if ((EDGE_PORT >= 1024)); then note "--edge-port $EDGE_PORT: not a privileged port, nothing to do"; return 0; fi
  local want current=
  want="$SUDOERS_MARK: the front door (HAProxy, as $USER_NAME) binds port $EDGE_PORT"$'\n'"$EDGE_KEY = $EDGE_PORT"
  if [[ ! -f $EDGE_SYSCTL || $(<"$EDGE_SYSCTL") != "$want" ]]; then
    act "$EDGE_SYSCTL: unprivileged ports from $EDGE_PORT" write_root_file "$EDGE_SYSCTL" "$want"
  fi
  read -r current </proc/sys/net/ipv4/ip_unprivileged_port_start || current=1024
  if ((current > EDGE_PORT)); then
    act "$EDGE_KEY = $EDGE_PORT (was $current)" sysctl -q -w "$EDGE_KEY=$EDGE_PORT"
  fi
}

write_root_file() {  # FILE CONTENT: root's file, mode 644, replaced atomically
  local t
  t=$(mktemp "$1.XXXXXXXX") && printf '%s\n' "$2" >"$t" && chmod 644 "$t" && mv -fT -- "$t" "$1"
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
  ensure_no_sudoers
  ensure_storage
  ensure_edge_port
  if ((CHANGES == 0)); then say "init_vm: no change"
  elif ((DRY_RUN)); then say "init_vm: $CHANGES change(s) would be made (dry run)"
  else say "init_vm: $CHANGES change(s)"; fi
}

# Run with stdin closed (with `bash -s` stdin is this script: no command may eat it), and exit on
# the same line, so `bash -s` never waits for the end of its stdin.
main "$@" </dev/null; exit $?
