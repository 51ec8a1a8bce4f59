"""One benchmark row: printed as a ``RESULT`` line (JSON) and appended to a JSON-lines file."""
import json


def emit(row: dict, out_file: str | None) -> None:
    print("RESULT", json.dumps(row), flush=True)
    if out_file:
        with open(out_file, "a") as f:
            f.write(json.dumps(row) + "\n")
