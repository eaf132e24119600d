"""The LLM-proposer loop: reply parsing, the search that keeps the best judged trial, and the
proposer against a scripted OpenAI-compatible server (request shape, malformed replies fed back,
retries), end to end through the pipeline with held-out pairs."""

import json

import pytest
import torch
from chat_server import ChatServer, completion
from conftest import DESCRIPTION, make_sae, tiny_model

from guard.autosteer import (
    AutosteerConfig,
    AutosteerError,
    ChatProposer,
    LatentRecord,
    ProposalError,
    autosteer,
    load_prompt_bank,
    parse_strengths,
    search_with_proposer,
)


def test_parse_strengths_reads_the_last_list_and_refuses_the_rest():
    assert parse_strengths("[0.1, 0.2]", 2) == [0.1, 0.2]
    assert parse_strengths("I tried [1, 1] before; now: [0.3, .5]. Good luck!", 2) == [0.3, 0.5]
    assert parse_strengths("[0.3, 0.5,]", 2) == [0.3, 0.5]  # not JSON: the numbers between the brackets
    for reply, problem in (("no list here", "no list"), ("[0.1, 0.2, 0.3]", "3 strengths, expected 2"),
                           ('["a", "b"]', "not a number"), ("", "no list")):
        with pytest.raises(ProposalError, match=problem):
            parse_strengths(reply, 2)


def test_search_keeps_the_best_judged_trial_and_falls_back_on_failures():
    script = [[0.2, 0.2], [0.9, 0.1], "fail", [0.9, 0.1], [5.0, 0.05]]  # best second; a failure; a repeat; clipped
    seen_history = []

    def propose(history):
        seen_history.append([t.strengths for t in history])
        item = script[len(history)]
        if item == "fail":
            raise ProposalError("unusable")
        return item

    def objective(strengths):
        return (10.0 if strengths == (0.9, 0.1) else -1.0), {"concept": strengths[0]}

    result = search_with_proposer(objective, 2, propose, budget=5, max_strength=1.0, seed=0)
    moves = [t.move for t in result.trials]
    assert moves == ["proposed", "proposed", "random (proposer failed)", "random (proposer repeated a trial)",
                     "proposed"]
    assert result.trials[-1].strengths == (1.0, 0.05)  # clipped to the range
    assert result.best.strengths == (0.9, 0.1) and result.best.step == 1  # best, not last
    assert len({t.strengths for t in result.trials}) == 5  # no point evaluated twice
    assert seen_history[0] == [] and seen_history[2] == [(0.2, 0.2), (0.9, 0.1)]
    with pytest.raises(AutosteerError):
        search_with_proposer(objective, 2, propose, budget=0)


LATENTS = [LatentRecord(7, "chosen", "top k", top_tokens=["arr", "matey"], snippets=["say [arr]"]),
           LatentRecord(3, "chosen", "top k", top_tokens=["ship"], snippets=["a [ship] sails"])]


def test_proposer_request_shape_and_malformed_replies_fed_back():
    with ChatServer() as server:
        server.error(503, "busy")                        # transient: retried by the endpoint
        server.reply("I think [0.5] would work")          # wrong count: sent back
        server.script.append((200, {"choices": []}))      # not a chat completion: asked again
        server.reply("Sure! [0.4, 0.25]")
        proposer = ChatProposer(server.base_url, "scorer-model", sleep=lambda s: None, attempts=3)
        assert proposer.propose(DESCRIPTION, LATENTS, 1.0, []) == [0.4, 0.25]
        first = server.requests[0]["json"]
        assert first["model"] == "scorer-model" and server.requests[0]["path"] == "/v1/chat/completions"
        system, user = first["messages"]
        assert system["role"] == "system" and "JSON list of 2 numbers" in system["content"]
        assert DESCRIPTION in user["content"] and "latent 7" in user["content"] and "'arr'" in user["content"]
        assert "initial guess" in user["content"]
        corrected = server.messages(2)  # the wrong count went back as assistant + the problem
        assert corrected[-2] == {"role": "assistant", "content": "I think [0.5] would work"}
        assert "1 strengths, expected 2" in corrected[-1]["content"]
        assert len(server.messages(3)) == 4  # the broken body added nothing to the conversation


def test_proposer_gives_up_after_its_attempts_and_shows_history():
    from guard.autosteer import Trial

    history = [Trial((0.1, 0.2), 0.3, {"concept": 0.5, "samples": [["Q1", "A1 arr"]]}, 0, "proposed"),
               Trial((0.6, 0.0), 0.7, {"concept": 0.9}, 1, "proposed")]
    with ChatServer() as server:
        for _ in range(2):
            server.reply("no idea")
        proposer = ChatProposer(server.base_url, "m", sleep=lambda s: None, attempts=2)
        with pytest.raises(ProposalError, match="no usable strengths in 2 replies"):
            proposer.propose(DESCRIPTION, LATENTS, 0.5, history)
        assert proposer.failures and "no list" in proposer.failures[0]
        user = server.messages(0)[1]["content"]
        assert "[0.1, 0.2] -> score 0.300" in user and "A1 arr" in user and "Best so far: [0.6, 0.0]" in user
        assert "0 (off) to 0.5" in server.messages(0)[0]["content"]
    with pytest.raises(AutosteerError, match="needs a scheme"):
        ChatProposer("127.0.0.1:1", "m")


def test_pipeline_with_a_scripted_proposer_and_held_out_pairs(word_tokenizer):
    torch.set_num_threads(1)
    model = tiny_model("llama", word_tokenizer)
    sae = make_sae(model)
    test_prompts = load_prompt_bank().test[:3]
    pairs = [(p, "arr arr arr", "I am a helpful assistant") for p in test_prompts]
    config = AutosteerConfig(k=2, candidates=6, cosine_candidates=2, budget=4, n_dev=3, n_test=3, max_new_tokens=4,
                             n_boot=200, min_output_score=-1e6, samples=1, tune_diffmean=False, control="equal-norm")
    with ChatServer(max_requests=40) as server:
        for reply in ("[0.2, 0.2]", "[0.9, 0.3]", "garbage", "garbage", "garbage", "[0.9, 0.3]"):
            server.reply(reply)
        proposer = ChatProposer(server.base_url, "scorer", sleep=lambda s: None, attempts=3)
        result = autosteer(model, word_tokenizer, sae, DESCRIPTION, config, pairs=pairs, proposer=proposer)
    search = result.searches["autosteer"]
    assert [t.move for t in search.trials] == ["proposed", "proposed", "random (proposer failed)",
                                               "random (proposer repeated a trial)"]
    assert result.strengths == list(search.best.strengths)
    assert search.best.score == max(t.score for t in search.trials)
    assert all("samples" in t.components for t in search.trials)
    assert result.proposer == proposer.name
    for condition in result.conditions:  # the held-out pairs are scored under every condition
        assert len(condition.values["pair_gap"]) == 3 and "pair_gap" in condition.estimates
    assert "pair_gap" in result.comparisons["none"]
    assert result.prompts["pairs"] == 3 and "## pair_gap" in result.markdown()
    json.dumps(result.to_dict())
    dev_pair = [(load_prompt_bank().dev[0], "arr", "no")]
    with pytest.raises(AutosteerError, match="share a prompt with the dev prompts"):
        autosteer(model, word_tokenizer, sae, DESCRIPTION, config, pairs=dev_pair)


def test_completion_helper_is_what_the_proposer_reads():
    proposer = ChatProposer("http://127.0.0.1:9/v1", "m")
    assert proposer._content(json.dumps(completion("[1]"))) == "[1]"
    with pytest.raises(ProposalError):
        proposer._content("{}")
