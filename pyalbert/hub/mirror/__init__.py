"""A model mirror that speaks the hub's HTTP API: ``albert hub serve``.

Air-gapped hosts (and the local one-machine environment) point ``HF_ENDPOINT`` at it and the
unchanged huggingface_hub client (``model_info(files_metadata=True)``, ``snapshot_download``,
``hf_hub_download``) downloads from a folder of model directories:

- ``GET /api/models/{repo}/revision/{rev}[?blobs=true]``: commit sha + siblings (size, blobId, lfs)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the
  sha256 with ``X-Linked-Etag``/``X-Linked-Size`` for LFS files), ``Range`` -> 206
- errors carry the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)

The protocol pieces (routes, headers, JSON bodies, ranges) are pure functions, shared with the
in-memory test hub (``tests/support/hubserver.py``). The disk side gives each repo a commit sha
derived from its listing (names, sizes, mtimes) and hashes each file once: digests are kept in
``ROOT/.albert-mirror-cache.json`` keyed by (size, mtime), so a restart rehashes nothing that did
not change. Bodies go out with ``sendfile``: serving a 100 GB model costs no memory.

Modules: ``protocol`` (the pure pieces), ``folders`` (listing, digests cache, snapshots),
``server`` (connection cap, timeouts, the handler), ``service`` (``Mirror``: repos + server).
"""
