"""Local paths only: a workdir or output path given as a URL (gs://, s3://, ...) is refused, with how to mount it.

dblocks reads and writes its workdirs with the ordinary file API (os, open, Orbax on a local path), which takes
`gs://bucket/run` for a relative folder named `gs:` and writes there without a word. A bucket works once it is
mounted as a folder (gcsfuse for Cloud Storage, s3fs / mountpoint-s3 for S3; `./launch.sh tpu mount` does it on a
TPU pod), so the entry points refuse any `scheme://` path at flag parsing, before anything is compiled or written.
"""
from __future__ import annotations

import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MOUNT_HINT = {
    "gs": "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET",
    "s3": "mount-s3 BUCKET /mnt/BUCKET (or s3fs)",
}


def url_scheme(path: str | None) -> str | None:
    """'gs' for 'gs://bucket/run', None for a local path (or None)."""
    m = _SCHEME.match(path or "")
    return m.group(1).lower() if m else None


def remote_path_problem(path: str | None, what: str, prefix: bool = True) -> str | None:
    """The one-line refusal for a URL `path` given as `what` (e.g. '--workdir'); None when the path is local.
    prefix=False leaves out the leading 'WHAT=PATH: ' (absl's flag errors already start with it)."""
    scheme = url_scheme(path)
    if scheme is None:
        return None
    bucket, _, rest = path[len(scheme) + 3:].partition("/")
    bucket = bucket or "BUCKET"
    mount = _MOUNT_HINT.get(scheme, "your storage's FUSE tool, mounted at /mnt/BUCKET").replace("BUCKET", bucket)
    body = (f"dblocks reads and writes local paths only ({scheme}:// would become a local folder named "
            f"'{scheme}:'). Mount the bucket as a folder ({mount}) and pass the mount path, e.g. "
            f"{what}=/mnt/{bucket}{'/' + rest if rest else ''} (docs/scale_out.md)")
    return f"{what}={path}: {body}" if prefix else body


def refuse_remote_flags(*holders) -> None:
    """Registers an absl validator on each flag holder (from flags.DEFINE_string) that refuses a URL value; absl
    checks it while parsing the flags, so the entry point stops with exit status 2 before it compiles or writes."""
    from absl import flags   # only the entry points call this; the library itself defines no flags

    def check(name: str):
        def checker(value) -> bool:
            problem = remote_path_problem(value, f"--{name}", prefix=False)
            if problem:
                raise flags.ValidationError(problem)
            return True
        return checker

    for h in holders:
        flags.register_validator(h.name, check(h.name))
