"""What the Hugging Face callback stands on besides the worker core: HF's checkpoint folder file by
file, the open callbacks released when ``train()`` raises, and resuming (``hf_resume_path``)."""
