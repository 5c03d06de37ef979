"""The SpecEdge prompt-set loaders: real files, the reference's sampling, Spec-Bench categories,
chat templates, and errors that name the file and row."""

import json
import os

import pytest

from specedge_jax.data import datasets

DATASET_DIR = os.environ.get("SPECEDGE_DATASET_DIR", datasets.DEFAULT_DATASET_DIR)
needs_data = pytest.mark.skipif(not os.path.isdir(DATASET_DIR),
                                reason=f"no prompt sets at {DATASET_DIR}")

# A Qwen3-style template: reads `enable_thinking` and, when it is false, pre-fills an empty
# think block (as Qwen3's own template does).
QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}")


def make_tokenizer(template: str):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  word_level = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
  word_level.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
  tokenizer.chat_template = template
  return tokenizer


class StrictTemplateTokenizer:
  """Fails on any keyword the template does not know: catches a stray `enable_thinking`."""

  chat_template = "{{ messages[0].content }}"

  def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
    assert tokenize is False and add_generation_prompt is True
    return "<" + conversation[0]["content"] + ">"


@needs_data
@pytest.mark.parametrize("dataset,rows", [("c4", 179), ("mtbench", 80), ("oasst", 540),
                                          ("wikitext", 629)])
def test_every_index_text_file_loads(dataset, rows):
  prompts = datasets.load_prompts(dataset, DATASET_DIR)
  assert len(prompts) == rows
  assert [p.index for p in prompts] == list(range(rows))
  assert all(p.dataset == dataset and p.category is None for p in prompts)
  assert all(isinstance(p.text, str) and p.text.strip() for p in prompts)
  if dataset == "mtbench":
    assert prompts[0].text.startswith("[INST]Compose an engaging travel blog post")


@needs_data
def test_specbench_loads_with_categories_in_reference_row_ranges():
  # All 480 rows through a fast stand-in template; the real jinja path is checked below.
  prompts = datasets.load_prompts("specbench", DATASET_DIR, tokenizer=StrictTemplateTokenizer())
  assert len(prompts) == 480
  for prompt in prompts:
    expected = datasets.SPECBENCH_CATEGORIES[prompt.index // 80]
    assert prompt.category == expected, prompt.index
  assert prompts[80].text.startswith("<Translate")
  every_40th = datasets.load_prompts("specbench", DATASET_DIR, sample_req_cnt=40,
                                     tokenizer=make_tokenizer(QWEN3_LIKE_TEMPLATE))
  assert [p.index for p in every_40th] == list(range(0, 480, 40))
  assert [p.category for p in every_40th[::2]] == list(datasets.SPECBENCH_CATEGORIES)
  first = every_40th[0].text
  assert first.startswith("<|im_start|>user\nCompose an engaging travel blog post")
  # Only the first turn is used, and the generation prompt is appended.
  assert "Rewrite your previous response" not in first
  assert first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@needs_data
def test_specbench_reasoning_switch():
  tokenizer = make_tokenizer(QWEN3_LIKE_TEMPLATE)
  thinking = datasets.load_prompts("specbench", DATASET_DIR, tokenizer=tokenizer,
                                   reasoning=True, max_request_num=1)
  plain = datasets.load_prompts("specbench", DATASET_DIR, tokenizer=tokenizer,
                                reasoning=False, max_request_num=1)
  assert thinking[0].text.endswith("<|im_start|>assistant\n")
  assert plain[0].text == thinking[0].text + "<think>\n\n</think>\n\n"


@needs_data
def test_enable_thinking_is_passed_only_to_templates_that_read_it():
  prompts = datasets.load_prompts("specbench", DATASET_DIR, tokenizer=StrictTemplateTokenizer(),
                                  reasoning=True, req_offset=80, max_request_num=81)
  assert len(prompts) == 1 and prompts[0].category == "translation"
  assert prompts[0].text.startswith("<") and prompts[0].text.endswith(">")
  plain = datasets.load_prompts("specbench", DATASET_DIR, tokenizer=make_tokenizer(PLAIN_TEMPLATE),
                                max_request_num=1)
  assert plain[0].text.startswith("[user] Compose") and plain[0].text.endswith("[assistant] ")


def test_specbench_needs_a_tokenizer_with_a_chat_template(tmp_path):
  (tmp_path / "specbench_prompts.jsonl").write_text(
      json.dumps({"question_id": 1, "category": "qa", "turns": ["q"]}) + "\n")
  with pytest.raises(ValueError, match="tokenizer"):
    datasets.load_prompts("specbench", tmp_path)
  with pytest.raises(ValueError, match="no chat template"):
    datasets.load_prompts("specbench", tmp_path, tokenizer=make_tokenizer(None))


def test_specbench_tokenizer_from_a_folder(tmp_path):
  (tmp_path / "specbench_prompts.jsonl").write_text(
      json.dumps({"question_id": 1, "category": "qa", "turns": ["why?"]}) + "\n")
  make_tokenizer(QWEN3_LIKE_TEMPLATE).save_pretrained(tmp_path / "tok")
  prompts = datasets.load_prompts("specbench", tmp_path, tokenizer=str(tmp_path / "tok"),
                                  reasoning=True)
  assert prompts == [datasets.Prompt("specbench", 0,
                                     "<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n",
                                     "qa")]


@pytest.mark.parametrize("offset,step,end,expected", [
    (0, 1, -1, list(range(10))),
    (0, 1, None, list(range(10))),
    (2, 3, -1, [2, 5, 8]),
    (1, 4, 9, [1, 5]),  # end is an exclusive row bound, as in the reference
    (0, 2, 5, [0, 2, 4]),
    (0, 1, 50, list(range(10))),  # an end past the file is the end of the file
    (12, 1, -1, []),
])
def test_sampling_arithmetic(offset, step, end, expected):
  assert datasets.sample_rows(10, offset, step, end) == expected


@pytest.mark.parametrize("kwargs", [dict(req_offset=-1), dict(sample_req_cnt=0),
                                    dict(max_request_num=-2)])
def test_sampling_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    datasets.sample_rows(10, **kwargs)


def test_sampling_applies_to_loaded_rows(tmp_path):
  rows = [[i, f"text {i}"] for i in range(20)]
  (tmp_path / "c4_prompts.json").write_text(json.dumps(rows))
  prompts = datasets.load_prompts("c4", tmp_path, req_offset=3, sample_req_cnt=5,
                                  max_request_num=19)
  assert [(p.index, p.text) for p in prompts] == [(3, "text 3"), (8, "text 8"),
                                                  (13, "text 13"), (18, "text 18")]


def test_specbench_categories_collapse_mtbench_subcategories():
  for sub in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
              "humanities"):
    assert datasets.specbench_category(sub) == "multi-turn"
  assert datasets.specbench_category("math_reasoning") == "math_reasoning"
  assert datasets.specbench_category("rag") == "rag"


def test_client_order_matches_reference_shuffle():
  import random

  prompts = [datasets.Prompt("c4", i, str(i)) for i in range(30)]
  indices = list(range(30))
  random.seed(3)
  random.shuffle(indices)
  assert [p.index for p in datasets.client_order(prompts, 3)] == indices
  other_client = [p.index for p in datasets.client_order(prompts, 4)]
  assert sorted(other_client) == list(range(30)) and other_client != indices


def test_prompt_is_frozen():
  prompt = datasets.Prompt("c4", 0, "x")
  with pytest.raises(AttributeError):
    prompt.text = "y"


def test_missing_file_names_the_file(tmp_path):
  with pytest.raises(datasets.DatasetError, match=r"wikitext_prompts\.json.*does not exist"):
    datasets.load_prompts("wikitext", tmp_path)


def test_unknown_dataset_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'gsm8k'"):
    datasets.load_prompts("gsm8k", tmp_path)


@pytest.mark.parametrize("content,match", [
    ("[[0, \"ok\"], [1, 2]]", r"oasst_prompts\.json: row 1 is not an \[index, text\] pair"),
    ("[[0, \"ok\"], \"loose\"]", r"oasst_prompts\.json: row 1 "),
    ("{\"0\": \"x\"}", r"oasst_prompts\.json: expected a JSON list"),
    ("[[0, \"ok\"", r"oasst_prompts\.json: not valid JSON"),
])
def test_malformed_json_rows_name_file_and_row(tmp_path, content, match):
  (tmp_path / "oasst_prompts.json").write_text(content)
  with pytest.raises(datasets.DatasetError, match=match):
    datasets.load_prompts("oasst", tmp_path)


@pytest.mark.parametrize("bad_line,match", [
    ("{not json", r"row 2 \(line 4\): not valid JSON"),
    (json.dumps({"category": "qa", "turns": []}), r"row 2 \(line 4\): 'turns' must be"),
    (json.dumps({"category": 7, "turns": ["q"]}), r"row 2 \(line 4\): 'category' must be"),
    (json.dumps(["q"]), r"row 2 \(line 4\): expected a JSON object"),
])
def test_malformed_specbench_row_names_file_and_row(tmp_path, bad_line, match):
  good = json.dumps({"question_id": 1, "category": "qa", "turns": ["q"]})
  # A blank line is skipped: row numbers count prompts, line numbers count lines.
  (tmp_path / "specbench_prompts.jsonl").write_text("\n".join([good, "", good, bad_line]) + "\n")
  with pytest.raises(datasets.DatasetError, match=r"specbench_prompts\.jsonl: " + match):
    datasets.load_prompts("specbench", tmp_path, tokenizer=StrictTemplateTokenizer())
