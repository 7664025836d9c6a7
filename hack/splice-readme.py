"""Replaces a generated section of the README (between its NAME:start and NAME:end markers)."""
import sys

readme_path, name, reference_path = sys.argv[1:4]
readme = open(readme_path).read()
start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
head, rest = readme.split(start, 1)
_, tail = rest.split(end, 1)
open(readme_path, "w").write(head + start + open(reference_path).read() + end + tail)
