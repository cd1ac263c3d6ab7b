"""A small built-in real text for --check: about 4 KB of public-domain English.

From the 1992 Library of Congress workshop proceedings (Project Gutenberg etext ``lcet10.txt``, a US
government work), a passage from its last 10 %, which the project's training recipes hold out.
"""

CHECK_TEXT = """\
The National Agricultural Library (NAL) has had extensive experience with
raster scanning of printed materials.  Since 1987, the Library has
participated in the National Agricultural Text Digitizing Project (NATDP)
a cooperative effort between NAL and forty-five land grant university
libraries.  An overview of the project will be presented, giving its
history and NAL's strategy for the future.

An in-depth discussion of NATDP will follow, including a description of
the scanning process, from the gathering of the printed materials to the
archiving of the electronic pages.  The type of equipment required for a
stand-alone scanning workstation and the importance of file management
software will be discussed.  Issues concerning the images themselves will
be addressed briefly, such as image format; black and white versus color;
gray scale versus dithering; and resolution.

Also described will be a study currently in progress by NAL to evaluate
the usefulness of converting microfilm to electronic images in order to
improve access.  With the cooperation of Tuskegee University, NAL has
selected three reels of microfilm from a collection of sixty-seven reels
containing the papers, letters, and drawings of George Washington Carver.
The three reels were converted into 3,500 electronic images using a
specialized microfilm scanner.  The selection, filming, and indexing of
this material will be discussed.

Donald WATERS

Project Open Book, the Yale University Library's effort to convert 10,
000 books from microfilm to digital imagery, is currently in an advanced
state of planning and organization.  The Yale Library has selected a
major vendor to serve as a partner in the project and as systems
integrator.  In its proposal, the successful vendor helped isolate areas
of risk and uncertainty as well as key issues to be addressed during the
life of the project.  The Yale Library is now poised to decide what
material it will convert to digital image form and to seek funding,
initially for the first phase and then for the entire project.

The proposal that Yale accepted for the implementation of Project Open
Book will provide at the end of three phases a conversion subsystem,
browsing stations distributed on the campus network within the Yale
Library, a subsystem for storing 10,000 books at 200 and 600 dots per
inch, and network access to the image printers.  Pricing for the system
implementation assumes the existence of Yale's campus ethernet network
and its high-speed image printers, and includes other requisite hardware
and software, as well as system integration services.  Proposed operating
costs include hardware and software maintenance, but do not include
estimates for the facilities management of the storage devices and image
servers.

Yale selected its vendor partner in a formal process, partly funded by
the Commission for Preservation and Access.  Following a request for
proposal, the Yale Library selected two vendors as finalists to work with
Yale staff to generate a detailed analysis of requirements for Project
Open Book.  Each vendor used the results of the requirements analysis to
generate and submit a formal proposal for the entire project.  This
competitive process not only enabled the Yale Library to select its
primary vendor partner but also revealed much about the state of the
imaging industry, about the varying, corporate commitments to the markets
for imaging technology, and about the varying organizational dynamics
through which major companies are responding to and seeking to develop
these markets.

Project Open Book is focused specifically on the conversion of images
from microfilm to digital form.  The technology for scanning microfilm is
readily available but is changing rapidly.  In its project requirements,
the Yale Library emphasized features of the technology that affect the
technical quality of digital image production and the costs of creating
and storing the image library:  What levels of digital resolution can be
achieved by scanning microfilm?  How does variation in the quality of
microfilm, particularly in film produced to preservation standards,
affect the quality of the digital images?  What technologies can an
operator effectively and economically apply when scanning film to
separate two-up images and to control for and correct image
imperfections?  How can quality control best be integrated into
digitizing work flow that includes document indexing and storage?
"""

PROMPT = "The National Agricultural Library (NAL) has had extensive experience with"
