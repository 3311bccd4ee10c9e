import pytest
import yaml

from jobs.kinds.align import AlignJob
from jobs.spec import SpecError, load_spec, parse_spec

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
        # A check across sections names its fields once, after the spec's name.
        ({"kind": "render", "input": {"manifest": "m"}, "output": {"path": "o"}, "options": {"pairs": "expression"}},
         r"^spec: options\.pairs draws each pair from the seed; it cannot be used with an input manifest$"),
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


def test_relative_local_paths_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "p.yaml").write_text(yaml.safe_dump({
        "kind": "pinch", "input": {"manifest": "../in/m.parquet"}, "output": {"path": "out"},
        "models": {"imitator": "s3://bucket/imitator", "parser": str(tmp_path / "parser")},
    }))
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    spec = load_spec(folder / "p.yaml")
    assert spec.input.manifest == str(tmp_path / "in" / "m.parquet")
    assert spec.output.path == str(folder / "out")
    assert spec.models.imitator == "s3://bucket/imitator"  # URIs and absolute paths stand as written
    assert spec.models.parser == str(tmp_path / "parser")


def test_pinch_defaults_to_the_shipped_models_and_the_regressors_start():
    spec = parse_spec({"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"}})
    assert spec.models.imitator is None and spec.models.parser is None and spec.models.regressor is None
    options = spec.options
    assert options.init == "recognize" and options.landmark_weight == 5.0 and options.prior_weight == 0.3
    assert not options.frontal_imitator and options.method == "affine68"
    # From the regressor: appearance held, styles kept; from the reference face: everything searched.
    from facecore.rig import default_schema

    appearance = tuple(p.name for p in default_schema().continuous if p.group == "appearance")
    assert options.held_parameters() == appearance and not options.search_styles()
    reference = parse_spec({"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                            "options": {"init": "reference", "hold": ["pose", "smile"]}}).options
    assert reference.held_parameters() == ("yaw", "pitch", "roll", "smile") and reference.search_styles()
    with pytest.raises(SpecError, match=r"options\.hold.*\['mood'\] are neither"):
        parse_spec({"kind": "pinch", "input": {"manifest": "m.csv"}, "output": {"path": "o"},
                    "options": {"hold": ["mood"]}})
    with pytest.raises(SpecError, match=r"data\.photo_repeat"):
        parse_spec({"kind": "train", "model": "parser", "data": {"renders": "r", "photo_repeat": 0},
                    "output": {"path": "o"}})
    with pytest.raises(SpecError, match=r"data\.photo_identities: .* model: parser"):
        parse_spec({"kind": "train", "model": "parser", "data": {"renders": "r", "photos": "p",
                                                                 "photo_identities": "m.csv"}, "output": {"path": "o"}})
    with pytest.raises(SpecError, match=r"data\.photo_identities: .* data\.photos: None"):
        parse_spec({"kind": "train", "model": "expression", "data": {"renders": "r", "photo_identities": "m.csv"},
                    "output": {"path": "o"}})
