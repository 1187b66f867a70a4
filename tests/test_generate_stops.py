"""Stop strings and streaming in our sampler: a row ends at exactly the token whose text completes a stop string
(with a real BPE vocabulary, where the string starts and ends inside tokens), other rows go on, and every token is
streamed as it is chosen."""

import torch

from base_model import QwenForCausalLM, QwenTokenizer
from base_model.generate import SamplingParams, generate
from conftest import tiny_config


def model_and_tokenizer():
    tok = QwenTokenizer.from_cl100k_base()
    torch.manual_seed(0)
    model = QwenForCausalLM(tiny_config(vocab_size=(len(tok) + 127) // 128 * 128)).eval()
    return model, tok


def test_a_stop_string_ends_the_row_on_the_token_that_completes_it():
    model, tok = model_and_tokenizer()
    prompts = [tok.encode("Question: what is 12*7?\nThought:"), tok.encode("Hello there")]
    free = generate(model, prompts, SamplingParams(max_new_tokens=40, temperature=0.0), pad_id=tok.pad_id)
    ids0 = free.token_ids[0]
    text0 = tok.decode(ids0)
    # a stop string that starts and ends inside tokens: characters from the middle of the free continuation
    k = next(j for j in range(2, len(ids0)) if len(tok.decode(ids0[:j])) > 8)
    start = len(tok.decode(ids0[: k - 1])) - 1
    stop = text0[start : start + 5]
    assert len(stop) == 5 and stop not in tok.decode(ids0[: k - 1])[:-1]
    first = text0.index(stop)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_strings=(stop, "zzzz-never"))
    streamed: dict[int, list[int]] = {0: [], 1: []}
    out = generate(model, prompts, params, pad_id=tok.pad_id, detokenize=tok.decode,
                   on_token=lambda row, t: streamed[row].append(t))  # fmt: skip
    ids = out.token_ids[0]
    assert ids == ids0[: len(ids)]  # the same tokens up to the stop
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])  # exactly the completing token
    assert tok.decode(ids).index(stop) == first
    assert out.finish_reasons[0] == "stop" and out.stop_strings[0] == stop
    assert out.token_ids[1] == free.token_ids[1] and out.finish_reasons[1] == "length"  # the other row goes on
    assert out.stop_strings[1] is None
    assert streamed == {0: out.token_ids[0], 1: out.token_ids[1]}  # every token, as chosen
