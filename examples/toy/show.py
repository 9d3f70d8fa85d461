"""Print records readably: each record's image (or video) file name and one field, e.g. a stage's `output`.

    flamingo encode imgs/ | flamingo generate --shots shots.jsonl | python show.py output
"""
import json
import sys
from pathlib import Path


def main(field: str) -> None:
    for line in sys.stdin:
        record = json.loads(line)
        name = Path(record.get("image") or record.get("video") or str(record.get("id", "?"))).name
        print(f"{name:<24} {record.get(field, '')}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "output")
