"""Privacy auditing: membership-inference attacks and empirical lower bounds on ε.

  canaries.py  canary sets and their per-run coin flips (inserted by the trainer, config.audit)
  attacks.py   loss-threshold and LiRA scores from model outputs
  roc.py       ROC curves, AUC and TPR at low FPR with bootstrap intervals
  bounds.py    one-run (Steinke, Nasr & Jagielski 2023) and independent-trial (Clopper–Pearson)
               lower bounds on ε
  audit.py     auditing a finished run's workdir: `python -m dpjax.audit --workdir=RUN`
"""
