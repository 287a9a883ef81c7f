"""Prompt sets and self-distillation data for drafter training and benchmarks."""
