"""flashtile inside other libraries: `import flashtile.integrations.transformers` registers it with
Hugging Face transformers."""
