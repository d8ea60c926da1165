"""Fast checks of the report's pieces (no simulation)."""

from __future__ import annotations

import json

from fedmeta.report.model import Report
from fedmeta.report.policy import WITHHELD, suppress, total
from fedmeta.report.render import SCHEMA_FILE, _md


def test_schema_file_is_the_models_schema():
    # regenerate: python -c "import json; from fedmeta.report.model import Report;
    #   print(json.dumps(Report.model_json_schema(), indent=2, sort_keys=True))"
    #   > fedmeta/report/schema.json
    assert json.loads(SCHEMA_FILE.read_text()) == Report.model_json_schema()


def test_small_counts_and_totals():
    assert [suppress(n, 5) for n in (0, 1, 4, 5, 12)] == [0, "<5", "<5", 5, 12]
    assert total([(3, 5), (1, 5)], 5) == "<5"
    assert total([(3, 5), (6, 5)], 5) == WITHHELD  # 9 - 6 would reveal the 3
    assert total([(5, 5), (6, 5)], 5) == 11
    assert total([(4, 3), (2, 5)], 5) == WITHHELD  # each site's own k
    assert total([], 5) == 0


def test_markdown_cells_cannot_break_a_table():
    assert _md("a | b\nc") == "a \\| b c"
