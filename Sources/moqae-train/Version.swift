/// The project's version, as `moqae-train --version` prints it; `moqae --version` prints the same
/// (`python/moqae/__init__.py`, checked by python/tests/test_package.py).
let projectVersion = "0.1.0"
