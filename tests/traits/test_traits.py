import json

import pytest

from guard.traits import SHIPPED_MINIMUMS, TraitError, list_traits, load_trait


def test_shipped_traits_are_valid_and_complete():
    names = list_traits()
    assert {"sycophancy", "hallucination", "evil", "myopic-reward"} <= set(names)
    for name in names:
        trait = load_trait(name)
        assert trait.name == name
        assert len(trait.instruction_pairs) >= SHIPPED_MINIMUMS["instruction_pairs"]
        assert len(trait.extraction_questions) >= SHIPPED_MINIMUMS["extraction_questions"]
        assert len(trait.evaluation_questions) >= SHIPPED_MINIMUMS["evaluation_questions"]
        assert not set(trait.extraction_questions) & set(trait.evaluation_questions)
        assert trait.examples, name
        prompt = trait.judge_prompt("Q?", "A.")
        assert "Q?" in prompt and "A." in prompt


def _valid():
    return json.loads(json.dumps(load_trait("sycophancy").to_dict()))


def test_user_trait_file_loads(tmp_path):
    data = _valid()
    data["name"] = "mine"
    data["instruction_pairs"] = data["instruction_pairs"][:1]  # user traits need only one of each
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    trait = load_trait(path)
    assert trait.name == "mine" and len(trait.instruction_pairs) == 1
    assert trait.fingerprint() != load_trait("sycophancy").fingerprint()


def test_every_problem_is_listed(tmp_path):
    data = _valid()
    del data["description"]
    data["evaluation_questions"].append(data["extraction_questions"][0])
    data["instruction_pairs"][0] = {"pos": "only one side"}
    data["judge_rubric"] = "Score {answer} only"
    data["surprise"] = 1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TraitError) as info:
        load_trait(path)
    message = str(info.value)
    for expected in ("missing key 'description'", "unknown key 'surprise'", "must be disjoint",
                     "instruction_pairs[0]", "placeholders {question} and {answer}"):
        assert expected in message


def test_unknown_name_and_broken_json(tmp_path):
    with pytest.raises(TraitError, match="unknown trait 'nope'.*sycophancy"):
        load_trait("nope")
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n  oops}')
    with pytest.raises(TraitError, match="line 2"):
        load_trait(broken)


def test_evaluation_prompts_of_several_traits_without_repeats():
    from guard.traits import TraitError, evaluation_prompts, load_trait

    both = evaluation_prompts(["sycophancy", "evil", "sycophancy"])
    assert both == list(load_trait("sycophancy").evaluation_questions) + list(load_trait("evil").evaluation_questions)
    with pytest.raises(TraitError, match="no shipped trait named 'made-up'"):
        evaluation_prompts(["made-up"])
