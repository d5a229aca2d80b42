"""Data loaders on the original formats, prompt masking, sampling and clear errors."""
from __future__ import annotations

import copy
import json
import logging

import pytest

from safeneurons import data
from safeneurons.data.examples import IGNORE_INDEX, Example
from safeneurons.errors import SafeneuronsError


def test_align_short_csv_by_name(shared_data):
    examples = data.load_examples("align_short", shared_data)
    assert len(examples) == 1015
    first = examples[0]
    assert first.formatted and first.prompt.startswith("[INST]") and first.prompt.endswith("[/INST]")
    assert first.response.startswith(" ")


def test_advbench_plain_text(shared_data):
    examples = data.load_examples(str(shared_data / "advbench.txt"))
    assert len(examples) == 520
    assert all(example.response is None and not example.formatted for example in examples)
    assert examples[0].prompt == (shared_data / "advbench.txt").read_text().splitlines()[0].strip()


def test_advbench_name_needs_data_dir(shared_data, tmp_path):
    assert len(data.load_examples("advbench", shared_data)) == 520
    with pytest.raises(SafeneuronsError, match="advbench.txt in the data directory"):
        data.load_examples("advbench", tmp_path)


def test_prompt_labels_are_masked_exactly(shared_data, demo_tokenizer):
    example = data.load_examples("align_short", shared_data)[3]
    sample = data.tokenize_example(demo_tokenizer, example, max_length=512)
    prompt_ids = demo_tokenizer(example.prompt)["input_ids"]
    # the original work's sample: prompt tokens (with BOS), then the response's own tokens without BOS, no EOS
    assert sample.input_ids.tolist() == prompt_ids + demo_tokenizer(example.response)["input_ids"][1:]
    assert (sample.labels[: len(prompt_ids)] == IGNORE_INDEX).all()
    response_ids = sample.labels[len(prompt_ids):]
    assert (response_ids != IGNORE_INDEX).all()
    assert demo_tokenizer.decode(response_ids) == example.response
    with_eos = data.tokenize_example(demo_tokenizer, example, max_length=512, add_eos=True)
    assert with_eos.input_ids.tolist() == sample.input_ids.tolist() + [demo_tokenizer.eos_token_id]


def test_plain_instructions_get_the_chat_template(demo_tokenizer):
    text = data.prompt_text(demo_tokenizer, Example("Plant a tree"))
    assert text == "[INST] Plant a tree [/INST]"
    ids = demo_tokenizer(text)["input_ids"]
    assert ids[0] == demo_tokenizer.bos_token_id and ids.count(demo_tokenizer.bos_token_id) == 1


LLAMA3_LIKE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "\n\n{% endif %}")
# a template that rewrites the assistant's past turns (as thinking models do): its rendering is not the prompt + text
REWRITING = ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}<think></think>{% endif %}"
             "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("template,separator", [(None, " "), (LLAMA3_LIKE, ""), (REWRITING, " ")])
def test_the_response_follows_the_templates_own_separator(demo_tokenizer, template, separator):
    """The template decides what comes between the prompt and the response: none after a header that ends in a
    newline, the demo's (Llama-2's) space without a template; a template that rewrites past turns falls back to
    a space after a prompt that does not end in whitespace. The response's tokens are the ones that follow the
    prompt in context, and a data file's leading space (the original's convention) is not doubled."""
    tokenizer = copy.deepcopy(demo_tokenizer)
    tokenizer.chat_template = template
    assert data.response_separator(tokenizer) == separator
    sample = data.tokenize_example(tokenizer, Example("Plant a tree", " I cannot."), max_length=512)
    response = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
    assert response == tokenizer(separator + "I cannot.", add_special_tokens=False)["input_ids"]


def test_truncation_drops_samples_without_response(demo_tokenizer, caplog):
    examples = [Example("[INST] short [/INST]", " ok", True),
                Example("[INST] " + "word " * 60 + "[/INST]", " cut away", True)]
    with caplog.at_level(logging.WARNING):
        samples = data.build_samples(examples, demo_tokenizer, None, 0, max_length=20)
    assert len(samples) == 1 and "1 of 2 samples" in caplog.text
    with pytest.raises(SafeneuronsError, match="every response is empty after truncation to max_length=8"):
        data.build_samples(examples[1:], demo_tokenizer, None, 0, max_length=8)


def test_nsamples_are_the_originals_calibration_set(shared_data):
    """The original draws `load_dataset("csv").shuffle(seed=seed).select(range(nsamples))`: the same rows here."""
    from datasets import load_dataset

    path = shared_data / data.NAMED_FILES["align_short"]
    original = load_dataset("csv", data_files={"train": str(path)}, split="train").shuffle(seed=7).select(range(16))
    chosen = data.select(data.load_examples("align_short", shared_data), 16, seed=7)
    assert [example.prompt for example in chosen] == original["prompt"]
    assert [example.response for example in chosen] == original["response"]


def test_system_prompt_in_the_original_llama2_format(demo_tokenizer):
    plain = copy.copy(demo_tokenizer)
    plain.chat_template = None  # Llama-2's [INST] format, as the original's apply_prompt_template builds it
    system = data.LLAMA2_DEFAULT_SYSTEM_PROMPT
    assert data.format_prompt(plain, "Plant a tree", system) == \
        "[INST] " + ("<<SYS>>\n" + system + "\n<</SYS>>\n\n" + "Plant a tree").strip() + " [/INST]"
    with pytest.raises(SafeneuronsError, match="drops system messages"):  # the demo's template has no system turn
        data.format_prompt(demo_tokenizer, "Plant a tree", system)


def test_nsamples_draws_with_seed_and_warns_when_too_large(caplog):
    examples = [Example(f"p{index}", "r") for index in range(10)]
    first = data.select(examples, 4, seed=1)
    assert first == data.select(examples, 4, seed=1) and first != data.select(examples, 4, seed=2)
    assert len(set(first)) == 4
    with caplog.at_level(logging.WARNING):
        assert data.select(examples, 50, seed=0) == examples
    assert "nsamples=50 is larger than the data set (10 examples)" in caplog.text


def test_jsonl_prompt_response_alpaca_and_chat(tmp_path, demo_tokenizer):
    path = tmp_path / "mixed.jsonl"
    records = [{"prompt": "Plant a tree", "response": "Dig a hole."},
               {"instruction": "Sum", "input": "2 and 3", "output": "5"},
               {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]}]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    examples = data.load_examples(str(path))
    assert [example.response for example in examples] == ["Dig a hole.", "5", "Hello."]
    assert examples[1].prompt == "Sum\n\n2 and 3"
    assert data.prompt_text(demo_tokenizer, examples[2]) == "[INST] Hi there [/INST]"
    samples = data.build_samples(examples, demo_tokenizer, None, 0, 64)
    assert all(bool(sample.response_mask.any()) for sample in samples)


@pytest.mark.parametrize("content, message", [
    ("question,answer\nq,a\n", "has columns \\[question, answer\\]; expected prompt,response"),
    ("", "holds no examples|not a readable CSV"),
])
def test_bad_csv_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(SafeneuronsError, match=message):
        data.load_examples(str(path))


def test_empty_text_file_and_unknown_name(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SafeneuronsError, match="holds no examples"):
        data.load_examples(str(empty))
    with pytest.raises(SafeneuronsError, match="'no-such-set' is neither a known name"):
        data.load_examples("no-such-set")
    with pytest.raises(SafeneuronsError, match="demo data set 'nope'"):
        data.load_examples("demo-nope")


def test_response_needed_for_samples(demo_tokenizer):
    with pytest.raises(SafeneuronsError, match="has no response"):
        data.build_samples([Example("just a prompt")], demo_tokenizer, None, 0, 32)


def test_demo_sets_are_disjoint_and_sized():
    align, utility = data.load_examples("demo-align"), data.load_examples("demo-utility")
    harmful, harmless = data.load_examples("demo-harmful"), data.load_examples("demo-harmless")
    assert len(align) == len(utility) == 1200 and len(harmful) == len(harmless) == 100
    train_prompts = {example.prompt for example in align + utility}
    assert not {data.LLAMA2_PROMPT.format(instruction=example.prompt) for example in harmful + harmless} & train_prompts
    assert all(example.response.startswith(" I") for example in align)
    assert all(example.response.startswith(" Sure") for example in utility)


def test_pad_batch_masks_padding(demo_tokenizer):
    samples = data.build_samples(data.load_examples("demo-align")[:3], demo_tokenizer, None, 0, 64)
    batch = data.pad_batch(samples, demo_tokenizer.pad_token_id)
    lengths = [len(sample.input_ids) for sample in samples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
