"""nn.Modules and tensors, no files: the hooked encoder, the attention decoder, the captioning model, decoding
(greedy, beam, sampling) and the vocabulary."""
