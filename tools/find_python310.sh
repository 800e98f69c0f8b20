#!/bin/sh
# Print the path of a working CPython 3.10 interpreter, or explain why there is none (exit 1).
# Order: $PYTHON310, a plain python3.10 that runs, pyenv's 3.10.x (the pyenv shim alone fails
# unless PYENV_VERSION is set), then common install locations.
works() { "$@" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; }
resolve() { "$@" -c 'import sys; print(sys.executable)'; }

if [ -n "${PYTHON310:-}" ]; then
    if works "$PYTHON310"; then resolve "$PYTHON310"; exit 0; fi
    echo "PYTHON310=$PYTHON310 is not a working CPython 3.10 with venv" >&2; exit 1
fi
if command -v python3.10 >/dev/null 2>&1 && works python3.10; then resolve python3.10; exit 0; fi
if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root 2>/dev/null)
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.[0-9]+)?$' | sort -t. -k3,3n -r); do
        if works "$root/versions/$v/bin/python3.10"; then echo "$root/versions/$v/bin/python3.10"; exit 0; fi
    done
fi
for p in /usr/bin/python3.10 /usr/local/bin/python3.10 /opt/python/3.10*/bin/python3.10 python3 python; do
    if command -v "$p" >/dev/null 2>&1 && works "$p"; then resolve "$p"; exit 0; fi
done
cat >&2 <<'MSG'
ERROR: no working CPython 3.10 found.
ddetr-d2 pins torch 2.3.1 and sal-detectron2 0.7.2, whose compiled detectron2._C exists only for CPython 3.10.
Install Python 3.10 (e.g. `pyenv install 3.10.13`, or your distribution's python3.10 + python3.10-venv),
or point PYTHON310=/path/to/python3.10 at one, then run make again.
For other Python/torch versions see README.md, "Environment, and using a source build of detectron2 instead".
MSG
exit 1
