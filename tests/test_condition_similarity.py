"""scripts/condition_similarity.py: the cosine statistics, grouping by person, and a run end to end."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from configs import load_config, model_config
from data.synthetic import make_synthetic
from models import XMDPT, export
from scripts import condition_similarity as cs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.depth=3", "model.num_heads=2", "data.cache=null"]


def test_identical_vectors_have_similarity_exactly_one():
    x = torch.randn(3, 257) * 1e3
    x = torch.cat([x, x[:1], x[:1]])
    sim = cs.cosine_matrix(x)
    assert sim[0, 3] == 1.0 and sim[3, 4] == 1.0 and (sim.diagonal() == 1.0).all()
    stats = cs.similarity_stats(torch.cat([x[:1]] * 3 + [x[1:2]] * 3), [0, 0, 0, 1, 1, 1])
    assert stats["within"] == 1.0 and stats["per_person"] == [1.0, 1.0]


def test_cosine_statistics():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    sim = cs.cosine_matrix(x)
    assert sim[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert sim[0, 2].item() == pytest.approx(-1.0)
    assert sim[0, 3].item() == pytest.approx(2 ** -0.5)
    stats = cs.similarity_stats(x, [0, 0, 1, 1])
    assert stats["per_person"] == pytest.approx([0.0, -(2 ** -0.5)], abs=1e-12)
    assert stats["within"] == pytest.approx(-(2 ** -0.5) / 2)
    # across: the pairs (0,2) (0,3) (1,2) (1,3)
    assert stats["across"] == pytest.approx((-1 + 2 ** -0.5 + 0 + 2 ** -0.5) / 4)
    assert stats["gap"] == pytest.approx(stats["within"] - stats["across"])


def test_grouping_by_identity_and_choice_of_views():
    paths = ["img/MEN/Denim/id_00000080/01_1_front.jpg", "img/WOMEN/Dresses/id_00000002/02_1_front.jpg",
             "img/MEN/Denim/id_00000080/01_2_side.jpg", "img/WOMEN/Dresses/id_00000002/02_3_back.jpg",
             "img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "img/WOMEN/Skirts/id_00000002/01_1_front.jpg",
             "img/MEN/Tees/id_00000007/01_1_front.jpg"]
    groups = cs.group_by_identity(paths)
    assert groups == {
        "img/MEN/Denim/id_00000080": paths[0:3:2],
        "img/MEN/Tees/id_00000007": paths[6:7],
        "img/WOMEN/Dresses/id_00000002": [paths[1], paths[3]],
        "img/WOMEN/Skirts/id_00000002": paths[5:6],  # same id number, another folder: another person
    }
    chosen = cs.choose_views(groups, persons=5, views_per_person=2, seed=0)
    assert chosen == {i: groups[i] for i in ("img/MEN/Denim/id_00000080", "img/WOMEN/Dresses/id_00000002")}
    with pytest.raises(ValueError, match=r"only 1 person\(s\)"):
        cs.choose_views(groups, 5, 2, 0, exclude={"img/MEN/Denim/id_00000080"})
    with pytest.raises(ValueError, match="at least 2 views"):
        cs.choose_views(groups, 5, 1, 0)


def test_runs_end_to_end(tmp_path, capsys):
    root = tmp_path / "data"
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [f"data.root={root}"])
    make_synthetic(root, num_identities=6, poses_per_identity=3, size=cfg["data"]["size"], seed=0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    model = XMDPT(model_config(cfg))
    export(model, tmp_path / "m", inference_only=False)
    out = tmp_path / "out" / "sim.json"
    # one test identity only: the train split has the five others
    result = cs.main(["--config", str(tmp_path / "cfg.yaml"), "--ckpt", str(tmp_path / "m"), "--split", "train",
                      "--persons", "3", "--views-per-person", "2", "--batch-size", "4", "--device", "cpu",
                      "--json", str(out)])
    assert "y = CANet(pose, global, local)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["similarity"] == result["similarity"] and saved["split"] == "train"
    assert set(saved["similarity"]) == set(cs.LABELS)

    pose_person = cs.identity_of(saved["target_pose"])
    persons = [p["identity"] for p in saved["persons"]]
    assert len(persons) == len(set(persons)) == 3 and pose_person not in persons
    for person in saved["persons"]:
        assert len(person["views"]) == 2
        assert {cs.identity_of(v) for v in person["views"]} == {person["identity"]}
    for stats in saved["similarity"].values():
        values = [stats["within"], stats["across"], *stats["per_person"]]
        assert len(stats["per_person"]) == 3 and all(-1 <= v <= 1 for v in values)
        assert stats["gap"] == pytest.approx(stats["within"] - stats["across"])
