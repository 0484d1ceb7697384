import pytest

from iteralite.pipeline.artifacts import RUN_FACTS, artifact_meta


def test_artifact_meta_drops_the_facts_of_one_run_at_any_depth():
    meta = {"stage": "qat", "steps": 3, "seconds": 1.5, "threads": 2,
            "finetune": {"steps": 4, "seconds": 2.0, "final_train_ce": 1.2}, "train_tokens_per_s": 9.0}
    assert artifact_meta(meta) == {"stage": "qat", "steps": 3, "finetune": {"steps": 4, "final_train_ce": 1.2}}
    assert {"train_seconds", "train_tokens_per_s", "resumed_from_step"} <= RUN_FACTS


@pytest.mark.parametrize("key", sorted(RUN_FACTS))
def test_every_run_fact_is_dropped(key):
    assert artifact_meta({key: 1, "keep": 2}) == {"keep": 2}
