"""Weight-only quantisation. For now the byte accounting of its formats (``accounting``); the quantiser
itself replaces the model's weight boundaries (``nn.Linear``, ``Experts.mm`` / ``grouped_mm``,
``TiedEmbedding``) after loading."""
