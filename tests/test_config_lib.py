"""Command-line overrides of list entries: `--config.experts[0].field=...`."""
import re

import pytest

from omnismola import config_lib
from test_docs_commands import main_flags

VLMOE = "configs/vlmoe.py:preset=tiny"


def test_list_entries_are_overridden_by_index(monkeypatch):
  args = [f"--config={VLMOE}", "--workdir=/tmp/unused",
          "--config.experts[0].capacity_factor=2",
          "--config.experts[-1].top_k=1"]
  with main_flags(args, monkeypatch) as main:
    experts = main._CONFIG.value.experts  # pylint: disable=protected-access
    assert experts[0]["capacity_factor"] == 2.0
    assert experts[1]["top_k"] == 1 and experts[0]["top_k"] == 2


@pytest.mark.parametrize("override, message", [
    ("--config.experts[2].top_k=1", "config.experts has 2 entries; [2] is "
     "out of range"),
    ("--config.experts.0.top_k=1", "index it as config.experts[0]"),
    ("--config.train[0].steps=1", "config.train is not a list"),
    ("--config.experts[0].tpo_k=1", "config.experts[0] has no field "
     "'tpo_k'"),
])
def test_bad_list_overrides_name_the_problem(override, message):
  config = config_lib.load_config_file(VLMOE)
  with pytest.raises(config_lib.ConfigKeyError, match=re.escape(message)):
    config_lib.check_override_keys(config, [override])
