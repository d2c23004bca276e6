from benchmarks.report import replace_section


def test_replace_section_touches_only_its_section(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# B\n\n## A\n\na\n\n## Mine\n\nold\n### sub\nold too\n\n## C\n\nc\n")
    replace_section(path, "## Mine", "new")
    assert path.read_text() == "# B\n\n## A\n\na\n\n## Mine\n\nnew\n\n## C\n\nc\n"
    replace_section(path, "## Added", "x")
    assert path.read_text().endswith("## C\n\nc\n\n## Added\n\nx\n")


def test_replace_section_creates_the_file(tmp_path):
    path = tmp_path / "new.md"
    replace_section(path, "## S", "body")
    assert path.read_text() == "# Benchmarks\n\n## S\n\nbody\n"
