import subprocess

from dpjax import provenance


def test_the_commit_is_the_environment_s_else_the_checkout_s_else_none(tmp_path, monkeypatch):
  monkeypatch.setenv(provenance.COMMIT_ENV, "1234abc")
  assert provenance.code_commit() == "1234abc"
  monkeypatch.delenv(provenance.COMMIT_ENV)
  found = provenance.code_commit()
  head = subprocess.run(["git", "-C", str(provenance._CHECKOUT), "rev-parse", "--short=7",
                         "HEAD"], capture_output=True, text=True)
  if head.returncode == 0:  # a git checkout (CI's clean clone is one)
    assert found in (head.stdout.strip(), head.stdout.strip() + "-dirty")
  monkeypatch.setattr(provenance, "_CHECKOUT", tmp_path)  # no repository there
  assert provenance.code_commit() is None
