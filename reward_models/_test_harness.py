"""Test harness, run inside the sandbox as ``main.py`` by the ``unit_test`` reward (standard library only).

It reads a nonce from stdin and the job from ``job.bin`` (then deletes the file) before any
untrusted code runs, keeps a private copy of stdout, runs the solution, then the tests, and
reports each result on that copy as a line tagged with the nonce:

    <nonce> PASS <i>            test i ran to its end
    <nonce> FAIL <i> <dict>     test i raised (type, message, line), as a Python literal
    <nonce> DONE                every test ran

The judge counts only tagged lines, and a test passes only if its PASS line is there; so a
solution that exits early (``sys.exit(0)``, ``os._exit(0)``) or prints look-alike lines
cannot pass tests that did not run. ``SystemExit`` raised by the solution's top level ends
the solution, not the run: the tests still run. Imports are kept to builtins (``marshal``,
no ``json`` or ``traceback``): start-up time is most of a short test's cost.
"""

import marshal
import os
import sys

SOURCES = {}


def _compile(name, text):
    SOURCES[name] = text.splitlines()
    return compile(text, name, "exec")


def _describe(err):
    """Type, message and the last line of the solution or tests the error went through."""
    where = ""
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name in SOURCES:
            lines = SOURCES[name]
            line = lines[tb.tb_lineno - 1].strip() if 0 < tb.tb_lineno <= len(lines) else ""
            where = f"{name}:{tb.tb_lineno}: {line}"
        tb = tb.tb_next
    return {"type": type(err).__name__, "message": str(err)[:300], "where": where[:300]}


def main():
    nonce = sys.stdin.readline().strip()
    with open("job.bin", "rb") as f:
        job = marshal.load(f)
    os.unlink("job.bin")
    out = os.fdopen(os.dup(1), "w", buffering=1)

    def report(*parts):
        out.write("\n" + nonce + " " + " ".join(parts) + "\n")
        out.flush()

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    solution_error = None
    try:
        exec(_compile("solution.py", job["solution"]), namespace)
    except SystemExit:
        pass
    except BaseException as err:  # noqa: BLE001 - any failure of untrusted code fails the tests
        solution_error = _describe(err)
    tests, entry_point = job["tests"], job["entry_point"]
    for i, test in enumerate(tests):
        if solution_error is not None:
            report("FAIL", str(i), repr(dict(solution_error, solution=True)))
            continue
        try:
            exec(_compile("tests.py" if len(tests) == 1 else f"test_{i}.py", test), namespace)
            # HumanEval's convention: the test source defines check(candidate), the harness calls it.
            if entry_point and len(tests) == 1 and callable(namespace.get("check")):
                if entry_point not in namespace:
                    raise NameError(f"entry point {entry_point!r} is not defined by the solution")
                namespace["check"](namespace[entry_point])
        except BaseException as err:  # noqa: BLE001 - includes SystemExit raised inside a test
            report("FAIL", str(i), repr(_describe(err)))
        else:
            report("PASS", str(i))
    report("DONE")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # leftover threads or atexit hooks of the solution must not hold the verdict


if __name__ == "__main__":
    main()
