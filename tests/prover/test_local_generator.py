"""The local-model generator through shared_moe, on a tiny random Llama (the DeepSeek-Prover-V1.5/V2-7B shape)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from prover.dataset import load_minif2f  # noqa: E402
from prover.generators import LocalModelConfig, LocalModelGenerator  # noqa: E402
from prover.prompts import build_prompt, cut_completion  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Random LlamaForCausalLM + a byte-level BPE tokenizer trained offline on miniF2F statements."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny_prover")
    problems = load_minif2f()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.header + p.informal_prefix + p.formal_statement for p in problems], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<bos>User: {{ m['content'] }}\n\n{% endfor %}"
                          "{% if add_generation_prompt %}Assistant:{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path, model, fast


@pytest.mark.slow
@pytest.mark.parametrize("style", ["v15", "v2_cot"])
def test_local_generator_matches_the_reference_greedy_decode(tiny_checkpoint, style):
    path, reference, tok = tiny_checkpoint
    problem = load_minif2f(split="test")[0]
    gen = LocalModelGenerator(LocalModelConfig(str(path), style=style, max_new_tokens=12, do_sample=False,
                                               dtype="float32"))
    candidate = gen.generate(problem, 0)

    prompt = build_prompt(style, problem)
    if prompt.messages:
        text = tok.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tok(prompt.text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.eos_token_id)
    decoded = tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert want.shape[1] > ids.shape[1]
    if style == "v15":
        assert candidate.kind == "completion" and candidate.text == cut_completion(decoded)
    else:  # random weights write no ```lean4 block, so the whole-file answer is empty and will be rejected
        assert candidate.kind == "file" and candidate.text == ""
    assert gen.generate(problem, 0) == candidate
