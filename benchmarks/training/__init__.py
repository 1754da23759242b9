"""A training comparison of GRPO and KPO in TRL's GRPOTrainer: `python -m benchmarks.training`.

task.py: the task, tokenizer and policy; trainers.py: the methods; run.py: one run and its
curves; report.py: the summaries; plot.py: the figure; __main__.py: the command.
"""
