"""Files in and out: checkpoints (:mod:`~multitoken.io.checkpoint`), portable heads
(:mod:`~multitoken.io.headfile`), exports (:mod:`~multitoken.io.export`), GGUF trunks
(:mod:`~multitoken.io.gguf`), the DeepSeek-V3 layout (:mod:`~multitoken.io.v3layout`), tokenizer
files (:mod:`~multitoken.io.tokenizer_files`), all written atomically (:mod:`~multitoken.io.atomic`)."""
