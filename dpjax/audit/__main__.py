"""python -m dpjax.audit --workdir=RUN [--shadow_workdirs=DIR,DIR,...] [--out=DIR]

Audits a finished run (see dpjax.audit.audit): writes audit.json and roc.png to --out (default
RUN/audit) and prints a summary. Exits with status 2, loudly, if the empirical lower bound on ε
exceeds the accountant's ε: that is a privacy bug, not a result.
"""

import sys

from absl import app, flags, logging

from dpjax.audit import audit
from dpjax.train import checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_SHADOWS = flags.DEFINE_list("shadow_workdirs", [], "Shadow runs for LiRA: the same config with "
                             "other audit.inclusion_seed values.")
_OUT = flags.DEFINE_string("out", "", "Where audit.json and roc.png go (default WORKDIR/audit).")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Confidence of the lower bound on epsilon.")
_POPULATION = flags.DEFINE_integer("population", 5000, "Members and non-members for the "
                                   "population attack (each).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 500, "Bootstrap resamples for the intervals.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    report = audit.audit_run(_WORKDIR.value, _SHADOWS.value, _CONFIDENCE.value,
                             _POPULATION.value, _BOOTSTRAP.value)
  except (audit.AuditError, checkpoint.CheckpointError) as e:
    print(f"Cannot audit: {e}", file=sys.stderr)
    sys.exit(1)
  paths = audit.write_report(report, _OUT.value or f"{_WORKDIR.value}/audit")
  print(audit.summary(report))
  print("wrote " + ", ".join(paths))
  try:
    audit.check_against_accountant(report)
  except audit.PrivacyViolation as e:
    print(e, file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
