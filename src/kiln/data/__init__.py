"""Raw data to clean documents: readers, extraction, filters, dedup, the curation pipeline."""
