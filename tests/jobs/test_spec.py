import pytest
import yaml

from jobs.spec import AlignJob, SpecError, load_spec, parse_spec

BASE = {"kind": "align", "input": {"manifest": "m.parquet"}, "output": {"path": "out/"}}


def _with(**changes):
    spec = {**BASE}
    for dotted, value in changes.items():
        section, _, field = dotted.partition("__")
        if field:
            spec[section] = {**spec.get(section, {}), field: value}
        else:
            spec[section] = value
    return spec


def test_defaults():
    spec = parse_spec(BASE)
    assert isinstance(spec, AlignJob)
    assert spec.options.faces == "largest" and spec.options.size == 256
    assert spec.resources.concurrency == 2 and spec.resources.num_gpus == 0


@pytest.mark.parametrize(
    "spec, message",
    [
        (_with(input__manifset="x"), r"input\.manifset: unknown field"),
        (_with(colour="red"), r"colour: unknown field"),
        (_with(options__size="big"), r"options\.size: .*integer.*'big'"),
        (_with(options__faces="most"), r"options\.faces: face policy must be"),
        (_with(resources__concurrency=0), r"resources\.concurrency: .*greater than or equal to 1"),
        (_with(options__method="rigid"), r"options\.method: .*'similarity5' or 'affine68'"),
        ({"kind": "align", "output": {"path": "o"}}, r"input: required field is missing"),
        (_with(input={}), r"input\.manifest: required field is missing"),
        (_with(kind="paint"), r"kind: must be one of \['align', .*'render'.*\], got 'paint'"),
        (_with(input__manifest="s3://key:secret@bucket/m.parquet"), r"credentials must not be embedded"),
        (_with(storage__aws_secret_access_key="x"), r"storage\.aws_secret_access_key: unknown field"),
        (_with(output__path="ftp://host/out"), r"output\.path: .*unsupported scheme 'ftp'"),
    ],
)
def test_errors_name_the_field(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_load_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_with(options__faces="index:1")))
    assert load_spec(tmp_path / "a.yaml").options.faces == "index:1"
    (tmp_path / "b.json").write_text('{"kind": "align"')
    with pytest.raises(SpecError, match="not valid YAML/JSON"):
        load_spec(tmp_path / "b.json")
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")
