"""What every stage shares: the typed config, project paths, errors, atomic writes, the project lock,
messages and progress, fingerprints (digests and stage inputs), secret references, and the private
library APIs loraflow relies on (kept in one place, with the versions they were checked against)."""
