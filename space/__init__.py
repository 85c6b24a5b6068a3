"""What turns this repository into a Hugging Face Space: defaults, and the publish command."""
