# Sourced by ./run-tests and ./run-demo: makes .venv with Visor and its test dependencies from PyPI,
# again whenever setup.cfg changes. Needs only Python 3.11 (or newer) on the machine.
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "visor needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
VENV="${VISOR_VENV:-$PWD/.venv}"
if [ ! -x "$VENV/bin/python" ] || [ setup.cfg -nt "$VENV/.installed" ]; then
  echo "setting up $VENV (once) ..." >&2
  "$PYTHON" -m venv "$VENV"
  # compat: a plain path entry; the default editable import hook costs ~20 ms at every start
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --config-settings editable_mode=compat -e ".[test]"
  touch "$VENV/.installed"
fi
