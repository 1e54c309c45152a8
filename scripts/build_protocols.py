"""Build ``studio/assets/protocols/dreambench.json`` from DreamBench's prompt and class lists.

    python scripts/build_protocols.py                 # (re)write the protocol file
    python scripts/build_protocols.py --check         # exit 1 if the committed file is out of date

The source is ``prompts_and_classes.txt`` of github.com/google/dreambooth (``dataset/``, CC-BY-4.0),
committed as ``studio/assets/protocols/dreambench_prompts_and_classes.txt``. It lists the 30 subjects with their
class nouns, then two Python lists of 25 prompts written as
``'a {0} {1} in the jungle'.format(unique_token, class_token)``. In the protocol file each
``{0} {1}`` becomes one ``{}``: the studio puts the concept's trigger and class noun there
("a <my-dog> dog in the jungle"). Live subjects are the pets (class ``cat`` or ``dog``), as in the
paper (9 live subjects, 21 objects). The photos themselves are not copied (users download them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# google/dreambooth dataset/prompts_and_classes.txt (CC-BY-4.0), committed beside the protocol it builds
DEFAULT_SOURCE = ROOT / "studio" / "assets" / "protocols" / "dreambench_prompts_and_classes.txt"
DEFAULT_OUT = ROOT / "studio" / "assets" / "protocols" / "dreambench.json"
LIVE_CLASSES = ("cat", "dog")
PROMPT = re.compile(r"^'(?P<text>[^']*)'\.format\(unique_token, class_token\),?$")


def parse(text: str) -> dict[str, object]:
    """The protocol dict from the text of ``prompts_and_classes.txt``.

    Raises ``ValueError`` when the file does not have the expected sections (30 subjects, 25 + 25
    prompts each holding ``{0} {1}`` once).
    """
    lines = [line.strip() for line in text.splitlines()]
    subjects: dict[str, str] = {}
    lists: list[list[str]] = []
    section = ""
    for line in lines:
        if line in ("Classes", "Object Prompts", "Live Subject Prompts"):
            section = line
            continue
        if section == "Classes" and "," in line and line != "subject_name,class":
            name, noun = (part.strip() for part in line.split(",", 1))
            subjects[name] = noun
        elif line.startswith("prompt_list"):
            lists.append([])
        elif lists and (match := PROMPT.match(line)):
            template = match.group("text")
            if template.count("{0} {1}") != 1:
                raise ValueError(f"prompt {template!r} does not hold '{{0}} {{1}}' exactly once")
            lists[-1].append(template.replace("{0} {1}", "{}"))
    if len(subjects) != 30 or len(lists) != 2 or any(len(items) != 25 for items in lists):
        raise ValueError(
            f"expected 30 subjects and two lists of 25 prompts, got {len(subjects)} subjects and lists of "
            f"{[len(items) for items in lists]}"
        )
    return {
        "format": 1,
        "name": "dreambench",
        "source": "https://github.com/google/dreambooth dataset/prompts_and_classes.txt (CC-BY-4.0)",
        "placeholder": ("{} = the concept as its method names it: trigger + class noun ('{unique_token} "
                        "{class_token}'), or the trigger alone for textual inversion, NeTI and Perfusion"),
        "images_per_prompt": 4,
        "live_classes": list(LIVE_CLASSES),
        "subjects": subjects,
        "live_subjects": [name for name, noun in subjects.items() if noun in LIVE_CLASSES],
        "prompts": {"object": lists[0], "live": lists[1]},
    }


def render(protocol: dict[str, object]) -> str:
    """Stable JSON text (the committed file)."""
    return json.dumps(protocol, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="prompts_and_classes.txt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    try:
        text = render(parse(args.source.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        print(f"error: cannot build the protocol from {args.source}: {err}", file=sys.stderr)
        return 2
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
