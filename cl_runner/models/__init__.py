"""Models and tokenizers: loading or building them (load), the token-level batch layout and losses (lm), the model
kind chosen once per model (kinds: causal LM or encoder-decoder; batch layout, generation, label scoring), the
encoder-decoder specifics (seq2seq) and greedy generation over a KV cache (generation).

May import: core and config.schema; nothing above (no strategies, scoring or engine)."""
