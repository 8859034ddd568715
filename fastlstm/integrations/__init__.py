"""Adapters that bring fastlstm's Monitor and doctor into other training frameworks (optional dependencies):
`fastlstm.integrations.lightning.DoctorCallback` (`pip install "fastlstm[lightning]"`)."""
