"""revnet.convert on Hugging Face transformers (models from configs, random weights, no hub): GPT-2,
Llama (rotary, grouped-query attention), Mistral, Qwen2, BERT and RoBERTa (post-norm), ViT. Float64:
the converted model's reversible gradients equal its own plain-autograd run on the same weights,
with attention masks, by both methods and in exact mode; at gamma = 0 it is the original model;
generate() and save_pretrained / from_pretrained still work."""

import copy
import warnings

import pytest
import torch

import revnet

T = pytest.importorskip("transformers")

from test_convert import grad_error, grads_of  # noqa: E402

VOCAB = 97


def config(kind):
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3}
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if kind == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_head=4, n_layer=3, vocab_size=VOCAB, n_positions=32, attn_pdrop=0.0,
                           resid_pdrop=0.0, embd_pdrop=0.0)
        return T.GPT2LMHeadModel, cfg
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": (T.LlamaForCausalLM, T.LlamaConfig),
               "mistral": (T.MistralForCausalLM, T.MistralConfig),
               "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config)}[kind]
        return cls[0], cls[1](**small, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    if kind in ("bert", "roberta"):
        cls = {"bert": (T.BertForMaskedLM, T.BertConfig),
               "roberta": (T.RobertaForMaskedLM, T.RobertaConfig)}[kind]
        return cls[0], cls[1](**small, **no_dropout, vocab_size=VOCAB, max_position_embeddings=40)
    assert kind == "vit"
    return T.ViTForImageClassification, T.ViTConfig(**small, **no_dropout, image_size=16, patch_size=4,
                                                    num_channels=1, num_labels=5)


def build(kind):
    torch.manual_seed(0)
    cls, cfg = config(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg).double()


def batch(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=g)}
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # the second sequence is padded
    return {"input_ids": ids, "attention_mask": mask}


def loss_fn(kind, inputs):
    if kind == "vit":
        return lambda m: m(**inputs).logits.square().sum()
    return lambda m: m(**inputs, labels=inputs["input_ids"]).loss


KINDS = ["gpt2", "llama", "mistral", "qwen2", "bert", "roberta", "vit"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method,exact", [("momentum", False), ("two-stream", False), ("momentum", True),
                                          ("two-stream", True)])
@pytest.mark.parametrize("kind", KINDS)
def test_reversible_gradients_equal_plain_autograd_and_gamma_zero_is_the_original(kind, method, exact):
    model, inputs = build(kind), batch(kind)
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    zero = revnet.convert(copy.deepcopy(model), method=method, gamma=0.0, example=inputs)
    assert zero.revnet_conversion.output_difference <= 1e-6
    with torch.no_grad():
        assert (zero(**inputs).logits - ref).abs().max() <= 1e-6 * ref.abs().max()
    model.train()
    revnet.convert(model, method=method, gamma=0.5 if exact else 0.9, exact=exact)
    plain = copy.deepcopy(model)
    revnet.set_reversible(plain, False)
    f = loss_fn(kind, inputs)
    # exact mode: the plain run computes the same lattice arithmetic, so the gradients agree bit for bit
    assert grad_error(grads_of(model, f), grads_of(plain, f)) <= (0.0 if exact else 1e-10)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_generate_and_save_pretrained_round_trip(tmp_path):
    model = build("gpt2")
    original = copy.deepcopy(model)
    revnet.convert(model, gamma=0.0)
    prompt = torch.tensor([[5, 6, 7]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    # generate() runs with the key/value cache, which every converted layer fills as before
    assert torch.equal(model.generate(prompt, **kw), original.generate(prompt, **kw))
    converted = revnet.convert(build("gpt2"), gamma=0.7)
    converted.save_pretrained(tmp_path)
    # unconverted: the checkpoint has the original keys
    loaded = T.GPT2LMHeadModel.from_pretrained(tmp_path).double()
    assert loaded.config.revnet_conversion == {"method": "momentum", "gamma": 0.7, "exact": False}
    revnet.convert(loaded)  # the config's method and gamma
    assert loaded.transformer.h.gamma == 0.7
    inputs = batch("gpt2")
    converted.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, converted(**inputs).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_drops_the_key_value_cache_with_a_warning():
    model = revnet.convert(build("llama"))
    inputs = batch("llama")
    with pytest.warns(UserWarning, match="key/value cache is off"):
        out = model(**inputs, labels=inputs["input_ids"], use_cache=True)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
