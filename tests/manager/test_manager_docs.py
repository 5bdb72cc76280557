"""docs/service-manager.md documents service.ini as speedysvc.manager.config reads it: every key
a service section (or [defaults]) and [web monitor] accept, no other, each with its default."""
import os
import re

import pytest

from speedysvc.manager import config

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "service-manager.md")


def doc_text() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def table_after(heading: str) -> list[tuple[str, str, str]]:
    """The rows (key, default, meaning) of the first Markdown table after the line starting with ``heading``."""
    lines = doc_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == "key" or set(cells[0]) <= {"-"}:
                continue
            key = re.fullmatch(r"`([a-z_]+)`", cells[0])
            assert key, f"a key in the table after {heading!r} is not `written_so`: {line}"
            rows.append((key.group(1), cells[1], cells[2]))
        elif in_table:
            break
    assert rows, f"no table after {heading!r} in {DOC}"
    return rows


def as_documented(default) -> str:
    return "" if default is None else str(default)


@pytest.mark.parametrize("heading, keys", [("Service keys", config.SERVICE_KEYS),
                                           ("`[web monitor]` keys", config.WEB_KEYS),
                                           ("`[store]` keys", config.STORE_KEYS)])
def test_the_doc_lists_every_key_once_and_no_other(heading, keys):
    documented = [key for key, _, _ in table_after(heading)]
    assert len(documented) == len(set(documented)), f"keys listed twice: {documented}"
    assert set(documented) - set(keys) == set(), "documented keys service.ini refuses"
    assert set(keys) - set(documented) == set(), "keys service.ini accepts that the doc does not list"


@pytest.mark.parametrize("heading, keys", [("Service keys", config.SERVICE_KEYS),
                                           ("`[web monitor]` keys", config.WEB_KEYS),
                                           ("`[store]` keys", config.STORE_KEYS)])
def test_the_doc_states_each_keys_default(heading, keys):
    wrong = {key: (default, as_documented(keys[key][1])) for key, default, _ in table_after(heading)
             if key in keys and default != as_documented(keys[key][1])}
    assert not wrong, "key: (the doc's default, the real one)"


def test_the_service_keys_table_is_the_one_config_describes():
    """``config.describe_keys()`` makes the table (keys, defaults, meanings) the doc keeps."""
    assert config.describe_keys() in doc_text()


def test_other_spellings_of_keys_are_mentioned():
    text = doc_text()
    for alias, key in config.SERVICE_ALIASES.items():
        assert alias in text and key in text, alias


def test_the_docs_example_ini_loads(tmp_path):
    """The doc's service.ini example passes the checks (the modules it names are not imported by ``load``)."""
    example = re.search(r"## service\.ini\s+```ini\n(.*?)```", doc_text(), re.S)
    assert example, "no ini example under '## service.ini'"
    ini = tmp_path / "service.ini"
    ini.write_text(example.group(1))
    cfg = config.load(str(ini))
    assert [s.section for s in cfg.services] == ["EchoServer"]
    assert (cfg.web.host, cfg.web.port) == ("127.0.0.1", 5155)
