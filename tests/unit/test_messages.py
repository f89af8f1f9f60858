"""loraflow.core.messages: stderr without a route; only the route (Prefect's run logger in a flow) with one, never both."""

from __future__ import annotations

from loraflow.core import messages


def test_lines_go_to_stderr_alone_or_to_the_route_alone(capsys):
    messages.stage("train")
    messages.say("r=16, alpha=32")
    assert capsys.readouterr().err == "==> train\n    r=16, alpha=32\n"

    seen: list[str] = []
    with messages.routed_to(seen.append):
        assert messages.routed()
        messages.note("prepare", "read 3 records")
        messages.say_block("label audit: example 1\n----\n[[cold]]\n")
    assert seen == ["prepare: read 3 records", "label audit: example 1", "----", "[[cold]]"]
    assert capsys.readouterr().err == ""  # not printed a second time
    assert not messages.routed()
    messages.say("after")
    assert capsys.readouterr().err == "    after\n"
