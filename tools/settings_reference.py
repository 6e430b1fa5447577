"""Writes the configuration reference of README.md (every setting of every service, its flag, environment
variable and default) from the settings classes, between the `settings-reference` markers. `--check` fails when
the README is stale; tests run it so the reference cannot drift from the code."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- settings-reference:begin -->", "<!-- settings-reference:end -->"


def services():
    from hotslot.services.executor.settings import ExecutorSettings
    from hotslot.services.registry.settings import RegistrySettings
    from hotslot.services.router.settings import RouterSettings
    from hotslot.services.storage_cache.settings import StorageCacheSettings

    return [("registry", RegistrySettings), ("storage-cache", StorageCacheSettings), ("executor", ExecutorSettings),
            ("router", RouterSettings)]


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None or value == "":
        return "–"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "–"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024**2 and value % 1024**2 == 0:
        return f"{value // 1024**3} GiB" if value % 1024**3 == 0 else f"{value // 1024**2} MiB"
    return str(value)


def render() -> str:
    lines = [BEGIN, ""]
    for name, cls in services():
        prefix = cls.model_config.get("env_prefix", "")
        lines += [f"#### {name} (`hotslot serve {name}`)", "", "| flag | environment | default | meaning |",
                  "|---|---|---|---|"]
        for field_name, field in cls.model_fields.items():
            flag = "--" + field_name.replace("_", "-")
            env = (prefix + field_name).upper()
            doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{flag}` | `{env}` | {_default(field)} | {doc} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    fresh = head + render() + tail
    if "--check" in argv:
        if fresh != text:
            print("README.md settings reference is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
