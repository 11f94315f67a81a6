"""What the demo and `lopd compare` print and draw: tables, CSV and charts, the papers' findings as
paired per-seed verdicts, mean ± 95% CI."""
