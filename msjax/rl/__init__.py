"""Reinforcement learning: GRPO and SPR losses, the train step and the trainer."""
