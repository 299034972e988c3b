"""Text in: tokenizers (:mod:`~multitoken.text.tokenizer`), chat templates
(:mod:`~multitoken.text.chat`) and prompts (:mod:`~multitoken.text.prompts`)."""
