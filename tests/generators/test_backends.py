from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from generators.backends import create_backend
from generators.backends.base import BackendError, BackendSaturated, GenerationOptions
from generators.backends.best_of_n import heuristic_rationale_score, pick_best_candidate
from generators.backends.openai_backend import OpenAIBackend
from generators.backends.template_backend import TEMPLATE_MARKER, TemplateBackend
from generators.prompt import build_prompt
from llmcf.errors import UserFacingError
from testkit.http import LocalHTTPServer
from tests.generators import make_request

# ---- template backend ------------------------------------------------------------------------------------------------


def test_template_is_deterministic_marked_and_label_consistent():
    backend = create_backend("template")
    assert (backend.name, backend.model) == ("template", "template-v1")
    liked = build_prompt(make_request(label=1), feedback="rating")
    disliked = build_prompt(make_request(label=0), feedback="rating")
    first = backend.generate([liked, disliked])
    again = TemplateBackend().generate([liked, disliked])
    assert first == again
    for generation in first:
        assert generation.text.startswith(TEMPLATE_MARKER)
        assert generation.completion_tokens == len(generation.text.split())
    assert 'the user liked "The Lion King (1994)"' in first[0].text
    assert 'the user did not like "The Lion King (1994)"' in first[1].text
    assert 'did not like "The Lion King' not in first[0].text
    # The data behind the rationale: 3 liked / 2 not, and the target's tags found among liked items.
    assert "liked 3 and did not like 2 items" in first[0].text
    assert (
        "3 of the target's 3 tags appear among items the user liked (Animation, Children's, Musical)" in first[0].text
    )


def test_template_handles_a_new_user():
    [generation] = TemplateBackend().generate([build_prompt(make_request(history=[], tags=()))])
    assert "new user" in generation.text and "the user clicked" in generation.text


# ---- best-of-n selection and the factory ------------------------------------------------------------------------------


def test_heuristic_prefers_consistent_relevant_complete_text():
    prompt = build_prompt(make_request(label=0))
    good = (
        "The user enjoys animated family comedies such as Toy Story and Aladdin but avoids crime thrillers. "
        "The Lion King is an animated musical about a young lion. Although it matches the animation tag, "
        "the user did not click it, perhaps because they had already seen it or wanted something new today."
    )
    contradicting = good.replace("did not click it", "clicked it")
    looping = "The user the user the user the user " * 20
    assert heuristic_rationale_score(prompt, good) > heuristic_rationale_score(prompt, contradicting)
    assert heuristic_rationale_score(prompt, good) > heuristic_rationale_score(prompt, looping)
    assert pick_best_candidate(prompt, [looping, contradicting, good]) == good


def test_factory_folds_flat_generation_options_and_rejects_unknown_names():
    backend = create_backend("template", temperature=0.0, candidates=3)
    assert backend.options == GenerationOptions(temperature=0.0, candidates=3)
    with pytest.raises(UserFacingError, match="unknown CoT backend"):
        create_backend("llama")
    with pytest.raises(ValueError):
        GenerationOptions(candidates=0)


# ---- OpenAI-compatible backend against a real local HTTP server --------------------------------------------------------


class FakeOpenAIServer(LocalHTTPServer):
    """A real HTTP server on 127.0.0.1 speaking the OpenAI completions API. `script` is a list of actions consumed one
    per request ("ok", "hang", or an HTTP status such as 503, optionally as (status, retry_after)); when it runs out,
    every request gets "ok". It records every request and the highest number of requests in flight at once."""

    def __init__(self, script: list | None = None, delay_s: float = 0.0, choices: list[str] | None = None):
        self.script = list(script or [])
        self.delay_s = delay_s
        self.choices = choices
        self.requests: list[tuple[str, dict, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def url(self) -> str:
        return self.origin

    def _next_action(self):
        with self.lock:
            return self.script.pop(0) if self.script else "ok"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, dict(self.headers), body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(body, fake._next_action())
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _answer(self, body, action):
                if action == "hang":
                    time.sleep(1.5)
                    return
                if action != "ok":
                    status, retry_after = action if isinstance(action, tuple) else (action, None)
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                time.sleep(fake.delay_s)
                prompt_text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
                title = re.search(r"Title: (.*)", prompt_text).group(1)
                texts = fake.choices or [f"reasoning about {title}"] * body["n"]
                key = "message" if "messages" in body else "text"
                choices = [
                    {"index": i, key: {"role": "assistant", "content": t} if key == "message" else t}
                    for i, t in enumerate(texts)
                ]
                payload = json.dumps(
                    {
                        "choices": choices,
                        "usage": {"prompt_tokens": len(prompt_text.split()), "completion_tokens": 7 * len(texts)},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


def prompts(n: int):
    return [build_prompt(make_request(request_id=f"r{i}", title=f"Movie {i}")) for i in range(n)]


def fast_backend(url: str, **kwargs) -> OpenAIBackend:
    settings = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "read_timeout_s": 5.0} | kwargs
    return OpenAIBackend(url, "smol", **settings)


def test_chat_request_carries_messages_options_and_key_and_counts_tokens(monkeypatch):
    monkeypatch.setenv("LLMCF_OPENAI_API_KEY", "sk-test-secret")
    with (
        FakeOpenAIServer() as server,
        fast_backend(server.url + "/v1", options=GenerationOptions(max_new_tokens=64, seed=7)) as backend,
    ):
        [generation] = backend.generate(prompts(1))
        assert "sk-test-secret" not in repr(backend)
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-secret"
    assert body["model"] == "smol" and body["temperature"] == 0.6 and body["max_tokens"] == 64 and body["seed"] == 7
    assert body["messages"][0]["role"] == "system" and body["messages"][1]["content"].endswith(
        "Let's think step by step."
    )
    assert generation.text == "reasoning about Movie 0"
    assert generation.prompt_tokens == len(body["messages"][1]["content"].split())
    assert generation.completion_tokens == 7


def test_completions_api_sends_plain_text_prompt():
    with FakeOpenAIServer() as server, fast_backend(server.url, api="completions") as backend:
        [generation] = backend.generate(prompts(1))
    path, _, body = server.requests[0]
    assert path == "/v1/completions"
    assert body["prompt"].endswith("Assistant:") and "messages" not in body
    assert body["max_tokens"] == 256  # the paper's limit is the default for servers
    assert generation.text == "reasoning about Movie 0"


def test_batch_is_concurrent_bounded_and_in_order():
    with FakeOpenAIServer(delay_s=0.2) as server, fast_backend(server.url, concurrency=4) as backend:
        generations = backend.generate(prompts(8))
    assert [g.text for g in generations] == [f"reasoning about Movie {i}" for i in range(8)]
    assert server.max_in_flight == 4  # concurrent (more than one at once), and bounded


def test_server_errors_are_retried_with_backoff():
    with FakeOpenAIServer(script=[500, 502]) as server, fast_backend(server.url, max_retries=3) as backend:
        [generation] = backend.generate(prompts(1))
    assert len(server.requests) == 3
    assert generation.text == "reasoning about Movie 0"


def test_server_errors_past_the_retry_budget_fail_the_batch():
    with FakeOpenAIServer(script=[500] * 5) as server, fast_backend(server.url, max_retries=2) as backend:
        with pytest.raises(BackendError, match="answered 500 after 3 attempts"):
            backend.generate(prompts(1))
    assert len(server.requests) == 3


def test_backpressure_honours_retry_after_then_succeeds():
    with (
        FakeOpenAIServer(script=[(503, "0.2"), (429, "0")]) as server,
        fast_backend(server.url, backpressure_waits=2) as backend,
    ):
        started = time.perf_counter()
        [generation] = backend.generate(prompts(1))
        assert time.perf_counter() - started >= 0.2
    assert len(server.requests) == 3
    assert generation.text == "reasoning about Movie 0"


def test_persistent_backpressure_raises_backend_saturated_with_retry_after():
    with (
        FakeOpenAIServer(script=[(429, "0.05")] * 10) as server,
        fast_backend(server.url, backpressure_waits=2) as backend,
    ):
        with pytest.raises(BackendSaturated) as caught:
            backend.generate(prompts(1))
    assert caught.value.retry_after_s == pytest.approx(0.05)
    assert len(server.requests) == 3  # 2 honoured waits, then the pool is told to pause
    assert not isinstance(caught.value, UserFacingError)


def test_retry_after_is_capped():
    with (
        FakeOpenAIServer(script=[(503, "3600")] * 3) as server,
        fast_backend(server.url, backpressure_waits=0, max_retry_after_s=2.0) as backend,
    ):
        with pytest.raises(BackendSaturated) as caught:
            backend.generate(prompts(1))
    assert caught.value.retry_after_s == 2.0


def test_hanging_server_times_out_and_fails_after_retries():
    with (
        FakeOpenAIServer(script=["hang", "hang"]) as server,
        fast_backend(server.url, read_timeout_s=0.3, max_retries=1) as backend,
    ):
        # ReadTimeout, not the server's own close after 1.5 s, ends each attempt
        with pytest.raises(BackendError, match="ReadTimeout"):
            backend.generate(prompts(1))
    assert len(server.requests) == 2


def test_unreachable_server_fails_after_retries():
    with FakeOpenAIServer() as server:
        url = server.url
    with fast_backend(url, max_retries=2, connect_timeout_s=0.5) as backend:
        with pytest.raises(BackendError, match="unreachable after 3 attempts"):
            backend.generate(prompts(1))


def test_client_errors_are_not_retried():
    with FakeOpenAIServer(script=[404]) as server, fast_backend(server.url) as backend:
        with pytest.raises(BackendError, match="rejected the request with 404"):
            backend.generate(prompts(1))
    assert len(server.requests) == 1


def test_candidates_are_requested_and_the_best_is_kept():
    good = (
        "The user likes animated comedies like Toy Story and Aladdin. Movie 0 is an animated musical that fits "
        "this profile well, and the user clicked it, consistent with their taste for family films and songs."
    )
    choices = ["the user the user the user the user the user", good, "The user did not click it."]
    with (
        FakeOpenAIServer(choices=choices) as server,
        fast_backend(server.url, options=GenerationOptions(candidates=3)) as backend,
    ):
        [generation] = backend.generate(prompts(1))
    assert server.requests[0][2]["n"] == 3
    assert generation.text == good
    assert generation.completion_tokens == 21  # every candidate's tokens are counted


def test_bad_base_url_is_an_operator_error():
    with pytest.raises(UserFacingError, match="http"):
        OpenAIBackend("localhost:8000", "smol")


# ---- transformers backend -------------------------------------------------------------------------------------------


def test_transformers_rejects_a_model_that_is_not_local(tmp_path):
    from generators.backends.model_loading import resolve_model_dir

    with pytest.raises(UserFacingError, match="never downloaded"):
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)
    with pytest.raises(UserFacingError, match="neither a .gguf file"):
        resolve_model_dir(tmp_path, tmp_path)


def test_transformers_rejects_unavailable_or_malformed_devices():
    import torch

    from generators.backends.model_loading import resolve_device

    with pytest.raises(UserFacingError, match="not 'cpu' or 'cuda"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserFacingError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.slow
def test_transformers_generates_with_the_real_smollm2():
    """SmolLM2-135M-Instruct from the shipped GGUF (converted once under $LLMCF_HOME/models, then reused)."""
    backend = create_backend("transformers", max_new_tokens=24, candidates=2, seed=1)
    try:
        assert backend.name == "transformers" and backend.model == "SmolLM2-135M-Instruct.Q4_1"
        requests = [
            make_request(label=1, title="The Lion King (1994)"),
            make_request(label=0, title="Heat (1995)", history=[]),
        ]
        generations = backend.generate([build_prompt(r) for r in requests])
    finally:
        backend.close()
    assert len(generations) == 2
    for generation in generations:
        assert generation.text.strip()
        assert "<|im_end|>" not in generation.text and "<|im_start|>" not in generation.text
        assert 1 <= generation.completion_tokens <= 2 * 24  # two candidates each
    assert (
        generations[0].prompt_tokens > generations[1].prompt_tokens > 50
    )  # the longer history gives the longer prompt


def test_grouped_query_sdpa_matches_stock_sdpa_on_a_padded_batch():
    """The CPU attention keeps K/V heads shared instead of copying them; it must not change a single output."""
    import torch
    from transformers import LlamaForCausalLM

    from generators.backends.transformers_backend import _cpu_attention

    config = tiny_llama_config(eos_token_id=-1)  # no row stops early: every step's logits are compared
    torch.manual_seed(0)
    # Each model gets its own config: `_from_config` writes the attention implementation into the one it is given.
    stock = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    grouped = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=_cpu_attention()).eval()
    assert stock.config._attn_implementation == "sdpa" != grouped.config._attn_implementation
    grouped.load_state_dict(stock.state_dict())
    input_ids = torch.randint(3, 128, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, :2] = 0
    with torch.inference_mode():
        outputs = [
            m.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for m in (stock, grouped)
        ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for stock_logits, grouped_logits in zip(outputs[0].logits, outputs[1].logits, strict=True):
        torch.testing.assert_close(stock_logits, grouped_logits, rtol=1e-5, atol=1e-5)


def tiny_llama_config(eos_token_id: int = 0):
    """A randomly initialised 2-layer Llama with grouped-query attention (6 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eos_token_id, pad_token_id=eos_token_id)


def tiny_llama(eos_token_id: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(tiny_llama_config(eos_token_id), attn_implementation="sdpa").eval()


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_prefix_decoder_matches_generate_with_padding_and_rows_that_finish_early():
    """Shared prefix computed once, own parts of different lengths (left-padded in the batch), one row stopping at its
    end-of-sequence token before the others: greedy tokens equal transformers' generate on each full prompt alone."""
    import torch

    from generators.backends.prefix_decoding import PrefixDecoder
    from generators.backends.sampling import Sampling

    prefix_ids = torch.randint(3, 128, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    own_parts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]

    def reference(model, eos: int) -> list[list[int]]:
        sequences = []
        for part in own_parts:
            ids = torch.tensor([prefix_ids + part])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, eos_token_id=eos, pad_token_id=eos)
            sequences.append(until_eos(out[0, ids.shape[1]:].tolist(), eos))
        return sequences

    unreachable = reference(tiny_llama(), eos=-1)
    eos = unreachable[1][3]  # the second prompt's fourth token: that row ends early (others may too)
    model = tiny_llama(eos)
    expected = reference(model, eos)
    assert len(expected[1]) == 4 and expected[1][-1] == eos

    decoder = PrefixDecoder(model, [eos])
    prefix = decoder.prefix(prefix_ids)
    outputs = decoder.generate(prefix, own_parts, max_new_tokens=8, sampling=Sampling(temperature=0))
    assert [candidates[0] for candidates in outputs] == expected
    # Candidates of one prompt share its prefill; greedy candidates are identical.
    twice = decoder.generate(prefix, own_parts, max_new_tokens=8, sampling=Sampling(temperature=0), candidates=2)
    assert [c for candidates in twice for c in candidates] == [s for s in expected for _ in range(2)]


def test_few_rows_linear_computes_the_module_s_own_product_for_any_row_count():
    import torch

    from generators.backends.prefix_decoding import few_rows_linear

    for bias in (False, True):
        module = torch.nn.Linear(24, 40, bias=bias)
        for rows in range(1, 18):
            x = torch.randn(rows, 1, 24)
            with torch.inference_mode():
                assert torch.allclose(few_rows_linear(module, x), module(x), atol=1e-5), (bias, rows)


def test_sampling_follows_temperature_and_nucleus():
    import torch

    from generators.backends.sampling import Sampling, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(4000, -1)
    torch.manual_seed(3)
    counts = torch.bincount(sample(logits, Sampling(temperature=1.0)), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
    nucleus = torch.bincount(sample(logits, Sampling(temperature=1.0, top_p=0.7)), minlength=4) / 4000
    assert nucleus[2] == 0 and nucleus[3] == 0 and abs(nucleus[0] - 0.5 / 0.8) < 0.03
    assert sample(logits[:2], Sampling(temperature=0)).tolist() == [0, 0]


@pytest.mark.slow
def test_prefix_caching_does_not_change_greedy_output_of_the_real_smollm2():
    """The CPU path (shared instruction prefix computed once, batched own parts) against stock transformers generate on
    each full prompt alone (SDPA attention, dynamic cache): the same text, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generators.backends.model_loading import resolve_model_dir
    from llmcf.settings import Settings

    requests = [
        make_request(label=1, title="The Lion King (1994)"),
        make_request(label=0, title="Heat (1995)", history=[("Fargo (1996)", ["Crime", "Drama"], 1)]),
        make_request(label=0, title="Casper (1995)", history=[], tags=()),
    ]
    prompts = [build_prompt(r, feedback="rating") for r in requests]
    # float32: the reference below is the stock model in float32 (the default on a CPU with native bfloat16 is bfloat16)
    backend = create_backend("transformers", temperature=0.0, max_new_tokens=40, dtype="float32")
    try:
        shared = backend._shared_prefix(prompts[0], *_chat_text_and_ids(backend._tokenizer, prompts[0]))
        assert len(shared) > 100  # the system message and the instructions
        generations = backend.generate(prompts)
        again = backend.generate(prompts[:1])
        assert list(backend._prefixes) == [shared]  # computed once, reused
    finally:
        backend.close()
    assert again[0] == generations[0]

    model_dir, _ = resolve_model_dir(None, Settings.from_env().home / "models")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", local_files_only=True).eval()
    for prompt, generation in zip(prompts, generations, strict=True):
        _, ids = _chat_text_and_ids(tokenizer, prompt)
        with torch.inference_mode():
            out = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=40, do_sample=False, pad_token_id=2, eos_token_id=2)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        assert generation.text == expected
        assert generation.prompt_tokens == len(ids)


def test_weights_default_to_bfloat16_only_where_the_hardware_computes_it(monkeypatch):
    import torch

    from generators.backends import model_loading as loading

    monkeypatch.setattr(loading, "_cpu_has_bfloat16", lambda: True)
    assert loading.default_dtype_name() == "bfloat16" and loading.resolve_dtype(None, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "_cpu_has_bfloat16", lambda: False)
    assert loading.default_dtype_name() == "float32" and loading.resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(UserFacingError, match="emulated"):
        loading.resolve_dtype("bfloat16", torch.device("cpu"))
    assert loading.resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_int8_weights_quantize_every_linear_layer_and_decode_through_the_cpu_path():
    """`--dtype int8` (opt-in): the real SmolLM2 with int8 linear layers writes through the shared-prefix decoder (which
    hands quantized layers their own kernel), and int8 is refused on a GPU."""
    import torch

    from generators.backends import model_loading as loading

    backend = create_backend("transformers", temperature=0.0, max_new_tokens=12, dtype="int8")
    try:
        layers = [m for m in backend._model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
        assert len(layers) >= 7 * backend._model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
        assert not any(type(m) is torch.nn.Linear for m in backend._model.modules())
        assert backend._prefix_decoder is not None
        generations = backend.generate([build_prompt(make_request(label=1)), build_prompt(make_request(label=0))])
        assert all(g.text.strip() and 0 < g.completion_tokens <= 12 for g in generations)
    finally:
        backend.close()
    with pytest.raises(UserFacingError, match="CPU option"):
        loading.resolve_dtype("int8", torch.device("cuda:0"))


def _chat_text_and_ids(tokenizer, prompt) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
