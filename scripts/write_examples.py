"""Write examples/lenet300_<scheme>.toml from the demo's embedded schemes (tests check they stay in step)."""
from pathlib import Path

from lcompress.demo import SCHEMES, scheme_config


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v + "'" if "\\" in v else '"' + v + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def to_toml(raw: dict, comment: str) -> str:
    lines = [f"# {comment}", "# run: lcompress compress " + f"examples/{raw['name']}.toml", ""]
    for k in ("name", "seed"):
        lines.append(f"{k} = {_value(raw[k])}")
    for section in ("model", "data", "reference", "schedule", "optimizer", "evaluate", "lc"):
        lines += ["", f"[{section}]"] + [f"{k} = {_value(v)}" for k, v in raw[section].items()]
    for t in raw["tasks"]:
        lines += ["", "[[tasks]]", f"params = {_value(t['params'])}"]
        comp = t["compression"]
        if isinstance(comp, list):
            lines.append("compression = [")
            lines += [f"    {_value(c)}," for c in comp]
            lines.append("]")
        else:
            lines.append(f"compression = {_value(comp)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "examples"
    out.mkdir(exist_ok=True)
    for name, (desc, _) in SCHEMES.items():
        raw = scheme_config(name)
        (out / f"{raw['name']}.toml").write_text(to_toml(raw, f"LeNet300 on Fashion-MNIST: {desc} (a demo scheme)"))


if __name__ == "__main__":
    main()
