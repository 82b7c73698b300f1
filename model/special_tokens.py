"""Reserved token ids, the same in every tokenizer the project trains (ARCHITECTURE.md, "Tokens").

The tokenizer trainer reserves these pieces first, in this order, so their ids are fixed.
"""
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bov>", "<eov>", "<latent>")
PAD, UNK, BOS, EOS, BOI, EOI, BOV, EOV, LATENT = range(len(SPECIAL_TOKENS))
