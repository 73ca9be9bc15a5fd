"""Reading training and generation inputs: images with captions, reflow pair shards, preference pairs, prompts."""
