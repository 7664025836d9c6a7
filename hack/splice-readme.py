"""Replaces the README's generated CRD reference (between the crd-reference markers)."""
import sys

readme_path, reference_path = sys.argv[1:3]
readme = open(readme_path).read()
start, end = "<!-- crd-reference:start -->\n", "<!-- crd-reference:end -->"
head, rest = readme.split(start, 1)
_, tail = rest.split(end, 1)
open(readme_path, "w").write(head + start + open(reference_path).read() + end + tail)
