"""What commands write for people: resumable captions files (JSONL/CSV) and the HTML attention gallery."""
